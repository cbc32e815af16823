"""TaylorSeer, with diffusers' own hooks (`diffusers.hooks.taylorseer_cache`), in its light variant.

After a few warm-up steps, one step in `interval` computes; on the others the output projection is predicted
by a first-order Taylor expansion over the last computed steps, and every block returns zeros without running
(diffusers' "lite" layout: blocks inactive, `proj_out` cached). Hooks sit on whole blocks and `proj_out`, never
inside a compiled block, and a predicted step reads no block weights, so streamed placement moves none. Each
diffusers hook is wrapped to pass straight through while the job has not picked this cache.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import StateManager
from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook, TaylorSeerState

from .base import CacheContext, CacheSettings, StepCache, context_name

WARMUP = 3  # diffusers' default: the first steps always compute, to seed the expansion


class _Hook(TaylorSeerCacheHook):
    def __init__(self, cache: "TaylorSeer", inactive: bool, counts: bool):
        states = StateManager(TaylorSeerState, init_kwargs={"taylor_factors_dtype": torch.float32, "max_order": 1,
                                                             "is_inactive": inactive})
        super().__init__(cache_interval=cache.interval, disable_cache_before_step=WARMUP,
                         taylor_factors_dtype=torch.float32, state_manager=states)
        self.cache, self.counts = cache, counts

    def new_forward(self, module, *args, **kwargs):
        cache = self.cache
        if not cache.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.counts:  # the first block's hook says what this step does, before any other block runs
            state = self.state_manager.get_state()
            step = state.current_step + 1
            cache.predicting = not cache.computes(step)
            if context_name(self.state_manager) != "uncond":
                cache.count(step, not cache.predicting)
        return super().new_forward(module, *args, **kwargs)


class TaylorSeer(StepCache):
    name = "taylorseer"

    def __init__(self, transformer):
        super().__init__()
        self.interval, self.predicting = 4, False
        self.hooks: list[_Hook] = []
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        for i, module in enumerate([*blocks, transformer.proj_out]):
            hook = _Hook(self, inactive=module is not transformer.proj_out, counts=i == 0)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, "taylorseer")
            self.hooks.append(hook)
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    def computes(self, step: int) -> bool:
        """diffusers' schedule: warm-up steps, then one step in `interval`."""
        return step < WARMUP or (step - WARMUP - 1) % self.interval == 0

    def configure(self, settings: CacheSettings, context: CacheContext) -> str:
        if settings.taylorseer_interval < 1:
            raise ValueError(f"TaylorSeer interval must be >= 1, got {settings.taylorseer_interval}")
        self.interval = int(settings.taylorseer_interval)
        for hook in self.hooks:
            hook.cache_interval = self.interval
        return f"TaylorSeer, one step in {self.interval} after {WARMUP} warm-up steps (first order)"

    def reset(self, num_steps: int) -> None:
        for hook in self.hooks:
            hook.state_manager.reset()
        self.predicting = False

    def skipping(self) -> bool:
        return self.enabled and self.predicting
