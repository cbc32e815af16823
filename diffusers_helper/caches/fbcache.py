"""First-block cache, with diffusers' own hooks (`diffusers.hooks.first_block_cache`).

The first block always runs; when its residual changed less than the threshold (relative mean absolute
difference) since the last computed step, the other blocks are skipped and their cached residuals added.
diffusers' hooks have no off switch, so each is wrapped in a subclass that passes straight through while the
job has not picked this cache; the rule and the residual handling stay diffusers'.
"""

from __future__ import annotations

from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import StateManager
from diffusers.hooks.first_block_cache import FBCBlockHook, FBCHeadBlockHook, FBCSharedBlockState

from .base import CacheContext, CacheSettings, StepCache, context_name, split_forward


class _Head(FBCHeadBlockHook):
    def __init__(self, cache: "FirstBlockCache", states: StateManager):
        super().__init__(states, threshold=0.05)  # the job's value is set by FirstBlockCache.configure
        self.cache = cache

    def new_forward(self, module, *args, **kwargs):
        cache = self.cache
        if not cache.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        output = super().new_forward(module, *args, **kwargs)
        if context_name(self.state_manager) != "uncond":  # count each step once
            cache.count(cache.step, self.state_manager.get_state().should_compute)
            cache.step += 1
        return output


class _Block(FBCBlockHook):
    def __init__(self, cache: "FirstBlockCache", states: StateManager, is_tail: bool):
        super().__init__(states, is_tail)
        self.cache = cache

    def new_forward(self, module, *args, **kwargs):
        if not self.cache.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        return super().new_forward(module, *args, **kwargs)


class FirstBlockCache(StepCache):
    name = "fbcache"

    def __init__(self, transformer):
        super().__init__()
        self.step = 0
        self.states = StateManager(FBCSharedBlockState, (), {})
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        if len(blocks) < 2:
            raise ValueError("the first-block cache needs at least two transformer blocks")
        self.head = _Head(self, self.states)
        for i, block in enumerate(blocks):
            hook = self.head if i == 0 else _Block(self, self.states, is_tail=i == len(blocks) - 1)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, f"fbcache_{i}")
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    def configure(self, settings: CacheSettings, context: CacheContext) -> str:
        if settings.fbcache_threshold < 0:
            raise ValueError(f"first-block cache threshold must be >= 0, got {settings.fbcache_threshold}")
        if split_forward():  # its rule reads the first block's output, which each rank holds only a part of
            raise ValueError("the first-block cache does not work with context parallel GPUs; use TeaCache, "
                             "MagCache or TaylorSeer")
        self.head.threshold = settings.fbcache_threshold
        return f"first-block cache, threshold {self.head.threshold:g}"

    def reset(self, num_steps: int) -> None:
        self.states.reset()
        self.step = 0

    def skipping(self) -> bool:
        return self.enabled and not self.states.get_state().should_compute
