"""Regional torch.compile of the transformer: one dual-stream and one single-stream block graph, reused for
all 60 blocks, with Inductor's caches on disk so a second launch does not compile again.

Only each block's own `forward` is compiled, innermost: step-cache hooks (diffusers' hook registry) and the
block streamer's module hooks stay outside the graph, in Python. diffusers' `compile_repeated_blocks` compiles
`module._call_impl` instead, which traces every hook too: a cache's per-step Python state then becomes guards,
each change recompiles, and after `recompile_limit` (8) dynamo silently runs those blocks eagerly, which is
why TeaCache with compile used to gain nothing.
"""

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


def _compile_innermost(block, compiled) -> None:
    """Wrap the block's own forward, beneath any diffusers hooks already registered on it."""
    registry = getattr(block, "_diffusers_hook", None)
    refs = getattr(registry, "_fn_refs", [])
    if not refs:
        block.forward = compiled(block.forward)
        return
    inner = refs[0]  # the first hook registered wraps the module's own forward
    if inner.original_forward is not None:
        inner.original_forward = compiled(inner.original_forward)
    else:
        inner.forward = compiled(inner.forward)


def compile_blocks(transformer, mode: str = "default") -> int:
    """Regional compile of the repeated blocks; returns how many blocks were compiled."""
    import torch

    kwargs = {} if mode == "default" else {"mode": mode}
    # dynamic=None: the first shape compiles static kernels; a second text length (prompts differ) marks that
    # dimension dynamic once, instead of recompiling for every prompt length. All blocks of one class share
    # their forward's code object, so dynamo compiles one graph per class and reuses it for every block.
    compiled = lambda fn: torch.compile(fn, dynamic=None, **kwargs)  # noqa: E731
    count = 0
    for module in transformer.modules():
        if module.__class__.__name__ in REPEATED_BLOCKS:
            _compile_innermost(module, compiled)
            count += 1
    if not count:
        raise TypeError("this transformer has none of the repeated blocks " + ", ".join(REPEATED_BLOCKS))
    log.info("torch.compile enabled for transformer (%d repeated blocks, mode %s)", count, mode)
    return count


def apply_compile(transformer, config: CompileConfig) -> int:
    """Compile per the config; 0 when compile is off."""
    if not config.enabled:
        return 0
    if config.module_cache:
        use_compile_cache(config.cache_dir)
    return compile_blocks(transformer, config.mode)
