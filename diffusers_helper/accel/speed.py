"""Speed options for the transformer: attention backend and regional torch.compile.

The attention backend goes through diffusers' attention dispatcher. "standard" uses PyTorch SDPA,
whose dispatch picks cuDNN attention on Hopper at FramePack's shape (REFERENCE.md: 628 TFLOP/s against
370 for the flash kernel; forcing it gave identical latents); "aggressive" forces xFormers; "off"
leaves PyTorch's default SDPA dispatch too. A backend can still be forced (FRAMEPACK_ATTENTION_BACKEND).
Regional compile compiles one dual-stream and one single-stream block graph and reuses them for all
60 blocks, with Inductor's caches on disk so a second launch does not compile again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("framepack.speed")

BACKEND_NAMES = {"native": "native", "cudnn": "_native_cudnn", "flash": "_native_flash", "efficient":
                 "_native_efficient", "math": "_native_math", "xformers": "xformers", "sage": "sage",
                 "flash-attn": "flash"}
REPEATED_BLOCKS = ["HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"]


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


def set_attention_backend(transformer, backend: str) -> str:
    """Apply a backend; a backend that cannot run here falls back to native SDPA, and the log says so."""
    name = BACKEND_NAMES.get(backend)
    if name is None:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    try:
        transformer.set_attention_backend(name)
    except Exception as exc:  # noqa: BLE001 - missing package, wrong GPU: fall back, say why
        log.warning("Attention backend %s unavailable (%s); using PyTorch SDPA", backend,
                    str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
        transformer.set_attention_backend("native")
        backend = "native"
    log.info("Attention backend: %s", backend)
    return backend


def use_compile_cache(cache_dir: str | Path) -> Path:
    """Keep Inductor's FX-graph and autotuning caches in our cache folder, so they survive reboots."""
    path = Path(cache_dir).resolve() / "torch_compile"
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return path


def compile_blocks(transformer, mode: str = "default") -> int:
    """Regional compile of the repeated blocks; returns how many blocks were compiled."""
    if not hasattr(transformer, "compile_repeated_blocks"):
        raise TypeError("this transformer has no compile_repeated_blocks (needs diffusers' ModelMixin)")
    transformer._repeated_blocks = REPEATED_BLOCKS  # the FramePack class does not declare them
    kwargs = {} if mode == "default" else {"mode": mode}
    # dynamic=None: the first shape compiles static kernels; a second text length (prompts differ) marks that
    # dimension dynamic once, instead of recompiling for every prompt length
    transformer.compile_repeated_blocks(dynamic=None, **kwargs)
    count = sum(1 for m in transformer.modules() if m.__class__.__name__ in REPEATED_BLOCKS)
    log.info("torch.compile enabled for transformer (%d repeated blocks, mode %s)", count, mode)
    return count


@dataclass(frozen=True)
class SpeedOptions:
    attention: str = "auto"  # our backend spelling, or auto
    xformers_mode: str = "standard"
    compile: bool = False
    compile_mode: str = "default"
    cache_dir: str = "cache"
    fp8: bool = False
    fp8_target_keys: tuple = ()
    fp8_exclude_keys: tuple = ("norm",)
    fp8_use_scaled_mm: bool = True
    quant_bits: int | None = None  # torchao INT8/INT4 weights (FRAMEPACK_ENABLE_QUANT, FRAMEPACK_QUANT_BITS)
    warmup: bool = True  # compile at start-up with one forward, unless FRAMEPACK_FAST_START
    module_cache: bool = True  # Inductor's caches in cache_dir (FRAMEPACK_ENABLE_MODULE_CACHE)


def convert_weights(transformer, options: SpeedOptions) -> dict:
    """FP8 or torchao integer linears: before placement, which lays the weights out as they will run."""
    fp8 = quant = 0
    if options.fp8 and options.quant_bits:
        raise ValueError("choose FP8 (FRAMEPACK_ENABLE_FP8) or torchao integers (FRAMEPACK_ENABLE_QUANT), not both")
    if options.fp8 and not getattr(transformer, "_framepack_fp8", False):
        from .fp8 import convert_to_fp8

        fp8 = convert_to_fp8(transformer, options.fp8_target_keys, options.fp8_exclude_keys, options.fp8_use_scaled_mm)
        transformer._framepack_fp8 = True
    if options.quant_bits and not getattr(transformer, "_framepack_quant", None):
        from .quant import quantize_torchao

        quant = quantize_torchao(transformer, options.quant_bits)
        transformer._framepack_quant = options.quant_bits
    return {"fp8_linears": fp8, "int_linears": quant}


def apply_speed(transformer, options: SpeedOptions) -> dict:
    """Attention backend, then regional compile; returns what is active (log, sidecars)."""
    backend = set_attention_backend(transformer, choose_attention_backend(options.xformers_mode, options.attention))
    compiled = 0
    if options.compile and not getattr(transformer, "_framepack_compiled", False):
        if options.module_cache:
            use_compile_cache(options.cache_dir)
        compiled = compile_blocks(transformer, options.compile_mode)
        transformer._framepack_compiled = True
    return {"attention": backend, "compiled_blocks": compiled}
