"""Residual step caches: the first block decides, skipped steps add the blocks' last residual to their input.

TeaCache and MagCache differ only in their skip rule (`ResidualCache.decide`), so they share these three hooks
on diffusers' hook registry:

- head (first dual block): asks the rule; on a skipped step returns its input untouched;
- skip (every middle block): passes its input through on a skipped step;
- tail (last single block): on a computed step records residual = output - head input; on a skipped step
  returns input + that residual.

The hooks wrap each block's forward from outside, so a compiled block graph never sees their Python state.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .base import StepCache, agree, context_name

_HEAD, _SKIP, _TAIL = "head", "skip", "tail"


class ResidualState(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.count = 0  # steps seen in this section
        self.residual: torch.Tensor | None = None
        self.block_input: torch.Tensor | None = None
        self.compute = True
        self.rule: dict = {}  # the skip rule's own accumulators


class _Hook(ModelHook):
    _is_stateful = True

    def __init__(self, cache: "ResidualCache"):
        super().__init__()
        self.cache = cache
        self.states = cache.states  # an attribute, so diffusers' cache_context() sets its context

    def reset_state(self, module):
        return module


class _HeadHook(_Hook):
    def new_forward(self, module, hidden_states, encoder_hidden_states, temb, *args, **kwargs):
        cache = self.cache
        if not cache.enabled:  # off: no state, so callers need no cache context
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
        st = cache.states.get_state()
        step = st.count
        compute = agree(cache.decide(st, step, module, hidden_states, temb) or st.residual is None)
        st.count += 1
        st.compute = compute
        if context_name(cache.states) != "uncond":  # count each step once, whatever the guidance
            cache.count(step, compute)
        if not compute:
            return hidden_states, encoder_hidden_states
        st.block_input = hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, *args, **kwargs)


class _SkipHook(_Hook):
    def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
        if self.cache.enabled and not self.cache.states.get_state().compute:
            return hidden_states, encoder_hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)


class _TailHook(_Hook):
    def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
        cache = self.cache
        if not cache.enabled:
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        st = cache.states.get_state()
        if not st.compute:
            return hidden_states + st.residual, encoder_hidden_states
        out_hidden, out_encoder = self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args,
                                                               **kwargs)
        residual = out_hidden - st.block_input
        cache.computed(st, residual)
        st.residual, st.block_input = residual, None
        return out_hidden, out_encoder


class ResidualCache(StepCache):
    """Attach once to a FramePack transformer; subclasses give the skip rule.

    Attached before any offloading hooks, so offloading stays the outer hook and the first block's weights are
    on the GPU when a rule reads them (TeaCache reads its norm); disabled, the hooks only pass through."""

    hook_prefix = "residual"

    def __init__(self, transformer):
        super().__init__()
        self.num_steps = 25
        self.states = StateManager(ResidualState)
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        if len(blocks) < 2:
            raise ValueError(f"{self.label} needs at least two transformer blocks")
        self._registries = []
        for i, block in enumerate(blocks):
            kind, cls = ((_HEAD, _HeadHook) if i == 0 else (_TAIL, _TailHook) if i == len(blocks) - 1
                         else (_SKIP, _SkipHook))
            registry = HookRegistry.check_if_exists_or_initialize(block)
            name = f"{self.hook_prefix}_{kind}"
            registry.register_hook(cls(self), name)
            self._registries.append((registry, name))
        self._root = HookRegistry.check_if_exists_or_initialize(transformer)
        self._root.invalidate_child_registries_cache()  # so cache_context() reaches the new hooks

    def decide(self, state: ResidualState, step: int, module, hidden_states, temb) -> bool:
        """Whether step `step` computes the blocks (asked at every step, so a rule can track its inputs; a step
        with no residual recorded yet computes whatever it says)."""
        raise NotImplementedError

    def computed(self, state: ResidualState, residual: torch.Tensor) -> None:
        """After a computed step, with the blocks' new residual (before it replaces the previous one)."""

    def skipping(self) -> bool:
        return self.enabled and not self.states.get_state().compute

    def reset(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.states.reset()

    def remove(self) -> None:
        for registry, name in self._registries:
            registry.remove_hook(name, recurse=False)
        self._registries = []
        self._root.invalidate_child_registries_cache()
