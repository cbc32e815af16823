"""One section's denoising: noise, shifted sigmas, guidance, and the UniPC solve.

Follows the original FramePack sampler exactly: float32 noise from a CPU generator,
flux time shift with mu from the sequence length, x0 = x - v * sigma computed from the model-dtype
input, real CFG with optional std rescale, distilled guidance fed as gs * 1000.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from .unipc import FlowMatchUniPC


class JobCancelled(Exception):
    """Raised between sampling steps when the user asked to stop."""


class CancelToken:
    """Thread-safe stop flag shared by the UI/CLI and the engine."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise JobCancelled()


def flux_mu(seq_len: int, x1=256, y1=0.5, x2=4096, y2=1.15, exp_max=7.0) -> float:
    k = (y2 - y1) / (x2 - x1)
    return min(k * seq_len + (y1 - k * x1), math.log(exp_max))


def flux_sigmas(steps: int, seq_len: int) -> torch.Tensor:
    """linspace(1, 0) through the flux time shift; steps + 1 values ending in 0."""
    mu = flux_mu(seq_len)
    t = torch.linspace(1, 0, steps + 1)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def rescale_cfg(pred_cfg: torch.Tensor, pred_pos: torch.Tensor, weight: float) -> torch.Tensor:
    """Match the CFG result's std to the positive prediction's (weight 0 leaves it unchanged)."""
    if weight == 0:
        return pred_cfg
    dims = list(range(1, pred_pos.ndim))
    rescaled = pred_cfg * (pred_pos.std(dim=dims, keepdim=True) / pred_cfg.std(dim=dims, keepdim=True))
    return weight * rescaled + (1.0 - weight) * pred_cfg


@dataclass
class Guidance:
    cfg: float = 1.0  # real classifier-free guidance; 1 means one model call per step
    gs: float = 10.0  # distilled guidance fed to the guidance embedder
    rs: float = 0.0  # CFG std rescale weight
    batch: bool = False  # run the two CFG branches as one batch of 2 (one call per step)


@dataclass
class StepInfo:
    step: int  # 0-based
    steps: int
    x: torch.Tensor
    denoised: torch.Tensor


def _cache_context(transformer, name: str):
    ctx = getattr(transformer, "cache_context", None)
    if ctx is None:
        import contextlib

        return contextlib.nullcontext()
    return ctx(name)


def _batch_branches(positive: dict, negative: dict) -> dict:
    """Positive and negative conditioning stacked along the batch; frame indices are shared."""
    out = {}
    for key, value in positive.items():
        if key.startswith("indices_") or not torch.is_tensor(value):
            out[key] = value
        else:
            out[key] = torch.cat([value, negative[key]])
    return out


def make_flow_model(transformer, positive: dict, negative: dict, guidance: Guidance, dtype: torch.dtype,
                    cancel: CancelToken | None = None):
    """Wrap the transformer as x0 = f(x, sigma) the solver integrates."""
    batch = positive["encoder_hidden_states"].shape[0]
    device = positive["encoder_hidden_states"].device
    gs_tensor = torch.tensor([guidance.gs * 1000.0] * batch).to(device=device, dtype=dtype)

    batched = _batch_branches(positive, negative) if guidance.batch and guidance.cfg != 1.0 else None

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if cancel is not None:
            cancel.raise_if_cancelled()
        sigma = sigma.float()
        x_in = x.to(dtype)
        timestep = (sigma * 1000.0).to(dtype)
        if batched is not None:
            with _cache_context(transformer, "cfg-batch"):
                pred_pos = transformer(hidden_states=torch.cat([x_in, x_in]), timestep=torch.cat([timestep, timestep]),
                                       guidance=torch.cat([gs_tensor, gs_tensor]), return_dict=False,
                                       **batched)[0].float()
        else:
            with _cache_context(transformer, "cond"):
                pred_pos = transformer(hidden_states=x_in, timestep=timestep, guidance=gs_tensor,
                                       return_dict=False, **positive)[0].float()
        if guidance.cfg == 1.0:
            pred = pred_pos
        elif batched is not None:
            pred_pos, pred_neg = pred_pos.chunk(2)
            pred = rescale_cfg(pred_neg + guidance.cfg * (pred_pos - pred_neg), pred_pos, guidance.rs)
        else:
            with _cache_context(transformer, "uncond"):
                pred_neg = transformer(hidden_states=x_in, timestep=timestep, guidance=gs_tensor,
                                       return_dict=False, **negative)[0].float()
            pred = rescale_cfg(pred_neg + guidance.cfg * (pred_pos - pred_neg), pred_pos, guidance.rs)
        x0 = x_in.float() - pred * sigma[(...,) + (None,) * (x.ndim - 1)]
        return x0.to(x.dtype)

    return model


def draw_noise(generator: torch.Generator, batch: int, window: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """Float32 noise on the generator's device (the CPU), one draw per section, as the original."""
    return torch.randn((batch, 16, window, lat_h, lat_w), generator=generator, device=generator.device,
                       dtype=torch.float32)


def sample_section(
    transformer,
    *,
    noise: torch.Tensor,
    steps: int,
    positive: dict,
    negative: dict,
    guidance: Guidance,
    dtype: torch.dtype,
    device: torch.device,
    on_step: Callable[[StepInfo], None] | None = None,
    cancel: CancelToken | None = None,
) -> torch.Tensor:
    """Denoise one section's latents (B, 16, T, H, W) and return the final x0 in float32."""
    _, _, frames, lat_h, lat_w = noise.shape
    sigmas = flux_sigmas(steps, frames * lat_h * lat_w // 4).to(device)
    latents = noise.to(device=device, dtype=torch.float32)
    model = make_flow_model(transformer, positive, negative, guidance, dtype, cancel)

    def report(i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if on_step is not None:
            on_step(StepInfo(step=i, steps=steps, x=x, denoised=denoised))

    return FlowMatchUniPC(model, variant="bh1").sample(latents, sigmas, on_step=report)
