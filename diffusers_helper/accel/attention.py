"""The attention kernel, through diffusers' attention dispatcher.

"standard" uses PyTorch SDPA, whose dispatch picks cuDNN attention on Hopper at FramePack's shape (measured:
about 630 TFLOP/s against 370 for the flash kernel, with identical latents when forced); "aggressive"
forces xFormers; "off" leaves PyTorch's default SDPA dispatch too. A backend can still be forced
(FRAMEPACK_ATTENTION_BACKEND); one that cannot run here falls back to SDPA, and the log says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("framepack.attention")

BACKEND_NAMES = {"native": "native", "cudnn": "_native_cudnn", "flash": "_native_flash", "efficient":
                 "_native_efficient", "math": "_native_math", "xformers": "xformers", "sage": "sage",
                 "sage-fp8": "_sage_qk_int8_pv_fp8_cuda_sm90", "flash-attn": "flash", "fa3": "_flash_3"}


@dataclass(frozen=True)
class AttentionConfig:
    backend: str = "auto"  # our spelling (BACKEND_NAMES), or auto
    xformers_mode: str = "standard"  # the original's switch: standard, aggressive (xFormers) or off


def choose_attention_backend(xformers_mode: str, requested: str) -> str:
    """Backend name (our spelling) from the settings."""
    if requested != "auto":
        return requested
    if xformers_mode == "aggressive":
        return "xformers"
    # "standard" and "off" both leave the kernel choice to PyTorch's SDPA dispatch: on Hopper it already
    # picks cuDNN attention at FramePack's shapes (measured bit-identical to forcing it), and unlike a
    # forced backend it falls back where cuDNN has no kernel (small head sizes)
    return "native"


def _already_native(transformer) -> bool:
    """No processor has a backend of its own and diffusers' process-wide default is SDPA: nothing to set."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    own = {getattr(m.processor, "_attention_backend", None) for m in transformer.modules()
           if getattr(m, "processor", None) is not None}
    return own <= {None} and str(getattr(_AttentionBackendRegistry._active_backend, "value", "")) == "native"


def _probe(transformer, name: str) -> None:
    """One small attention call through the backend: a package can import and still fail on this GPU (a kernel
    built for another architecture, a wheel built against another torch), and that must not fail a job later."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    p = next(transformer.parameters())
    dtype = p.dtype if p.dtype in (torch.float16, torch.bfloat16) or p.device.type == "cpu" else torch.bfloat16
    q = torch.randn(1, 128, 2, 128, device=p.device, dtype=dtype)  # (batch, tokens, heads, head dim)
    out = dispatch_attention_fn(q, q, q, backend=AttentionBackendName(name))
    if not torch.isfinite(out).all():
        raise RuntimeError("it returned non-finite values")


def set_attention_backend(transformer, backend: str) -> str:
    """Apply a backend; a backend that cannot run here falls back to native SDPA, and the log says so."""
    name = BACKEND_NAMES.get(backend)
    if name is None:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "native" and _already_native(transformer):
        log.info("Attention backend: native (PyTorch SDPA dispatch)")  # already the model's default
        return backend
    try:
        transformer.set_attention_backend(name)
        if name != "native":
            _probe(transformer, name)
    except Exception as exc:  # noqa: BLE001 - missing package, wrong GPU, broken build: fall back, say why
        log.warning("Attention backend %s unavailable (%s); using PyTorch SDPA", backend,
                    str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
        transformer.set_attention_backend("native")
        backend = "native"
    log.info("Attention backend: %s", backend)
    return backend


def apply_attention(transformer, config: AttentionConfig) -> str:
    return set_attention_backend(transformer, choose_attention_backend(config.xformers_mode, config.backend))
