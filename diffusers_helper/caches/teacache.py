"""TeaCache for the FramePack transformer, as the original app does it, on diffusers' hook system.

At each step the first dual block's modulated input is compared with the previous step's (relative
L1, rescaled by a fitted polynomial and accumulated). While the sum stays under the threshold, all
transformer blocks are skipped and the residual they added last time is reused. The first and last
step of a section always compute. State is kept per cache context ("cond"/"uncond"), so real CFG
does not mix the two branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .base import StepCache

RESCALE = np.poly1d([7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02])
_HEAD, _SKIP, _TAIL = "teacache_head", "teacache_skip", "teacache_tail"


@dataclass
class TeaCacheConfig:
    enabled: bool = False
    threshold: float = 0.15
    num_steps: int = 25


class _State(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.count = 0
        self.accumulated = 0.0
        self.prev_modulated: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.block_input: torch.Tensor | None = None
        self.compute = True


class _StepHook(ModelHook):
    """The three TeaCache hooks share one per-step state and the config."""

    _is_stateful = True

    def __init__(self, states: StateManager, config: TeaCacheConfig):
        super().__init__()
        self.states, self.config = states, config


class _HeadHook(_StepHook):
    """First dual block: decides whether this step runs the blocks."""

    def __init__(self, states: StateManager, config: TeaCacheConfig, stats: dict):
        super().__init__(states, config)
        self.stats = stats

    def new_forward(self, module, hidden_states, encoder_hidden_states, temb, *args, **kwargs):
        if not self.config.enabled:  # off: no state, so callers need no cache context
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
        st = self.states.get_state()
        modulated = module.norm1(hidden_states, emb=temb)[0]
        if st.count == 0 or st.count == self.config.num_steps - 1 or st.residual is None:
            compute = True
            st.accumulated = 0.0
        else:
            prev = st.prev_modulated
            rel = ((modulated - prev).abs().mean() / prev.abs().mean()).item()
            st.accumulated += float(RESCALE(rel))
            compute = st.accumulated >= self.config.threshold
            if compute:
                st.accumulated = 0.0
        st.prev_modulated = modulated
        st.count = (st.count + 1) % self.config.num_steps
        st.compute = compute
        self.stats["computed" if compute else "skipped"] += 1
        if not compute:
            return hidden_states, encoder_hidden_states
        st.block_input = hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, *args, **kwargs)


class _SkipHook(_StepHook):
    """Middle blocks: pass through when the step is skipped."""

    def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
        if self.config.enabled and not self.states.get_state().compute:
            return hidden_states, encoder_hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)


class _TailHook(_StepHook):
    """Last single block: records the blocks' residual, or applies the cached one."""

    def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
        if not self.config.enabled:
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        st = self.states.get_state()
        if not st.compute:
            return hidden_states + st.residual, encoder_hidden_states
        out_hidden, out_encoder = self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args,
                                                               **kwargs)
        st.residual = out_hidden - st.block_input
        st.block_input = None
        return out_hidden, out_encoder


class TeaCache(StepCache):
    """Attach once to a FramePack transformer, then `configure` per job and `reset` per section.

    Attach before any offloading hooks, so offloading stays the outer hook and the blocks' weights are
    on the GPU when the head hook reads the first block's norm; disabled, the hooks only pass through.
    """

    name = "TeaCache"

    def __init__(self, transformer):
        super().__init__()
        self.config = TeaCacheConfig()
        self._states = StateManager(_State)
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        if len(blocks) < 2:
            raise ValueError("TeaCache needs at least two transformer blocks")
        self._registries = []
        for i, block in enumerate(blocks):
            registry = HookRegistry.check_if_exists_or_initialize(block)
            if i == 0:
                hook, name = _HeadHook(self._states, self.config, self.stats), _HEAD
            elif i == len(blocks) - 1:
                hook, name = _TailHook(self._states, self.config), _TAIL
            else:
                hook, name = _SkipHook(self._states, self.config), _SKIP
            registry.register_hook(hook, name)
            self._registries.append((registry, name))
        self._root = HookRegistry.check_if_exists_or_initialize(transformer)
        self._root.invalidate_child_registries_cache()  # so cache_context() reaches the new hooks

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def skipping(self) -> bool:
        """Inside a forward: whether this step reuses the cached residual instead of running the blocks."""
        return self.config.enabled and not self._states.get_state().compute

    def configure(self, enabled: bool, threshold: float = 0.15) -> None:
        if threshold < 0:
            raise ValueError(f"TeaCache threshold must be >= 0, got {threshold}")
        self.config.enabled, self.config.threshold = enabled, threshold

    def reset(self, num_steps: int) -> None:
        self.config.num_steps = num_steps
        self._states.reset()
        self.stats["computed"] = self.stats["skipped"] = 0

    def remove(self) -> None:
        for registry, name in self._registries:
            registry.remove_hook(name, recurse=False)
        self._registries = []
        self._root.invalidate_child_registries_cache()
