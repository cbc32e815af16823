"""Sampler pieces: sigma schedule, solver call count, guidance, cancellation, TeaCache."""

import math

import pytest
import torch

from diffusers_helper.pipeline.sampling import (CancelToken, Guidance, JobCancelled, flux_mu, flux_sigmas, rescale_cfg,
                                       sample_section)
from diffusers_helper.pipeline.unipc import FlowMatchUniPC


def test_flux_mu_line_and_cap():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(10**6) == pytest.approx(math.log(7.0))


def test_flux_sigmas_shape_and_ends():
    s = flux_sigmas(25, 9 * 80 * 80 // 4)
    assert s.shape == (26,)
    assert s[0] == pytest.approx(1.0) and s[-1] == 0.0
    assert torch.all(s[1:] < s[:-1])
    # shift pushes sigmas up: the midpoint stays above 0.5
    assert s[12] > 0.5


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 25])
def test_unipc_calls_model_once_per_step(steps):
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        return torch.zeros_like(x)  # x0 = 0: the exact flow is x_t = sigma * x_1

    x = torch.randn(1, 4, 2, 3, 3)
    sigmas = flux_sigmas(steps, 64)
    out = FlowMatchUniPC(model).sample(x.clone(), sigmas)
    assert len(calls) == steps
    assert calls == pytest.approx(sigmas[:steps].tolist())
    assert torch.all(out == 0)


def test_unipc_exact_on_a_constant_target():
    """A model that always predicts the same x0 is integrated exactly to the last sigma."""
    target = torch.randn(1, 4, 2, 3, 3)
    x = torch.randn(1, 4, 2, 3, 3)
    sigmas = flux_sigmas(6, 64)
    seen = []

    def model(x_t, t):
        seen.append(x_t.clone())
        return target.clone()

    FlowMatchUniPC(model).sample(x, sigmas)
    s = float(sigmas[5])
    expected = s * x + (1 - s) * target  # linear interpolation path of rectified flow
    assert torch.allclose(seen[-1], expected, atol=1e-5)


def test_rescale_cfg_weight_zero_is_identity_and_one_matches_std():
    pos = torch.randn(2, 3, 4, 5, 5)
    cfg = pos * 3 + 1
    assert torch.equal(rescale_cfg(cfg, pos, 0.0), cfg)
    out = rescale_cfg(cfg, pos, 1.0)
    assert torch.allclose(out.std(dim=(1, 2, 3, 4)), pos.std(dim=(1, 2, 3, 4)), rtol=1e-5)


class _Fake(torch.nn.Module):
    """Stands in for the transformer: records calls, predicts a velocity from the conditioning."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, hidden_states, timestep, guidance, encoder_hidden_states, return_dict=False, **kw):
        self.calls.append(float(encoder_hidden_states.mean()))
        return (hidden_states * 0.1 + encoder_hidden_states.mean(),)


def _cond(value):
    return {"encoder_hidden_states": torch.full((1, 4, 8), value)}


def test_cfg_one_calls_once_and_cfg_above_one_calls_negative():
    noise = torch.randn(1, 16, 2, 2, 2)
    fake = _Fake()
    sample_section(fake, noise=noise, steps=3, positive=_cond(1.0), negative=_cond(-1.0), guidance=Guidance(cfg=1.0),
                   dtype=torch.float32, device=torch.device("cpu"))
    assert fake.calls == [1.0, 1.0, 1.0]
    fake.calls.clear()
    sample_section(fake, noise=noise, steps=3, positive=_cond(1.0), negative=_cond(-1.0), guidance=Guidance(cfg=2.0),
                   dtype=torch.float32, device=torch.device("cpu"))
    assert fake.calls == [1.0, -1.0] * 3


def test_cancel_between_steps():
    token = CancelToken()
    fake = _Fake()
    steps_seen = []

    def on_step(info):
        steps_seen.append(info.step)
        if info.step == 1:
            token.cancel()

    with pytest.raises(JobCancelled):
        sample_section(fake, noise=torch.randn(1, 16, 2, 2, 2), steps=10, positive=_cond(1.0),
                       negative=_cond(0.0), guidance=Guidance(), dtype=torch.float32, device=torch.device("cpu"),
                       on_step=on_step, cancel=token)
    assert steps_seen == [0, 1]
    assert len(fake.calls) == 2  # stopped before the third model call
