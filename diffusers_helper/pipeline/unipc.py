"""Flow-matching UniPC (variant bh1/bh2), the solver the original FramePack samples with.

Written in the data-prediction form: the model function returns x0 and time is the flow sigma, with
lambda = -log(sigma). Each step runs a predictor (order up to 3, lower orders while warming up), one
model evaluation, then the corrector; `steps` model calls in total. diffusers' UniPCMultistepScheduler
differs in its warm-up and final step, so parity with the original needs this small solver.
"""

from __future__ import annotations

from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepFn = Callable[[int, torch.Tensor, torch.Tensor], None]


def _bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - 1)]


def _unipc_coefficients(rks: torch.Tensor, hh: torch.Tensor, order: int, variant: str):
    """Solve for the predictor/corrector weights of one step (UniPC, Zhao et al. 2023, Alg. 1-2)."""
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = torch.expm1(hh)
    else:
        raise ValueError(f"unknown UniPC variant {variant!r} (use 'bh1' or 'bh2')")

    rows, rhs = [], []
    factorial = 1
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r_mat = torch.stack(rows)
    b_vec = torch.tensor(rhs, device=rks.device)
    return h_phi_1, b_h, r_mat, b_vec


class FlowMatchUniPC:
    def __init__(self, model_fn: ModelFn, variant: str = "bh1"):
        self.model_fn = model_fn
        self.variant = variant

    def _update(self, x, model_prev, t_prev, t, order):
        ndim = x.dim()
        t0 = t_prev[-1]
        m0 = model_prev[-1]
        lambda_0 = -torch.log(t0)
        h = -torch.log(t) - lambda_0

        rks, d1s = [], []
        for i in range(1, order):
            rk = ((-torch.log(t_prev[-(i + 1)]) - lambda_0) / h)[0]
            rks.append(rk)
            d1s.append((model_prev[-(i + 1)] - m0) / rk)
        rks.append(1.0)
        rks = torch.tensor(rks, device=x.device)

        hh = -h[0]
        h_phi_1, b_h, r_mat, b_vec = _unipc_coefficients(rks, hh, order, self.variant)

        if d1s:
            d1s = torch.stack(d1s, dim=1)
            rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(
                r_mat[:-1, :-1], b_vec[:-1]
            )
            pred_res = torch.tensordot(d1s, rhos_p, dims=([1], [0]))
        else:
            d1s = None
            pred_res = 0
        rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r_mat, b_vec)

        x_lin = _bcast(t / t0, ndim) * x - _bcast(h_phi_1, ndim) * m0
        x_pred = x_lin - _bcast(b_h, ndim) * pred_res
        model_t = self.model_fn(x_pred, t)

        corr_res = torch.tensordot(d1s, rhos_c[:-1], dims=([1], [0])) if d1s is not None else 0
        x_corr = x_lin - _bcast(b_h, ndim) * (corr_res + rhos_c[-1] * (model_t - m0))
        return x_corr, model_t

    def sample(self, x: torch.Tensor, sigmas: torch.Tensor, on_step: StepFn | None = None) -> torch.Tensor:
        """Integrate from sigmas[0] to the last non-zero sigma; returns the final x0 prediction."""
        steps = len(sigmas) - 1
        order = min(3, steps - 1) if steps > 1 else 1
        model_prev: list[torch.Tensor] = []
        t_prev: list[torch.Tensor] = []
        for i in range(steps):
            t = sigmas[i].expand(x.shape[0])
            if i == 0:
                model_x = self.model_fn(x, t)
            else:
                x, model_x = self._update(x, model_prev, t_prev, t, min(i, order))
            model_prev = (model_prev + [model_x])[-order:]
            t_prev = (t_prev + [t])[-order:]
            if on_step is not None:
                on_step(i, x, model_x)
        return model_prev[-1]
