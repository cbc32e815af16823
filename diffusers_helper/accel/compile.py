"""Regional torch.compile of the transformer: one dual-stream and one single-stream block graph, reused for
all 60 blocks, with Inductor's caches on disk so a second launch does not compile again."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("framepack.compile")

REPEATED_BLOCKS = ["HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"]


@dataclass(frozen=True)
class CompileConfig:
    enabled: bool = False
    mode: str = "default"  # torch.compile mode
    cache_dir: str = "cache"
    module_cache: bool = True  # Inductor's caches in cache_dir (FRAMEPACK_ENABLE_MODULE_CACHE)
    warmup: bool = True  # compile at start-up with one forward, unless FRAMEPACK_FAST_START


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


def apply_compile(transformer, config: CompileConfig) -> int:
    """Compile per the config; 0 when compile is off."""
    if not config.enabled:
        return 0
    if config.module_cache:
        use_compile_cache(config.cache_dir)
    return compile_blocks(transformer, config.mode)
