"""The step-cache interface: a cache the engine and the block streamer have never heard of plugs in by name."""

import torch
from diffusers.hooks import HookRegistry, ModelHook

from diffusers_helper.caches import base
from diffusers_helper.caches.base import NoStepCache, StepCache, attach_step_cache
from diffusers_helper.memory.placement import Placement, streamer_of
from diffusers_helper.models.loading import load_models
from diffusers_helper.models.tiny import build_tiny_transformer, tiny_spec
from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.events import Finished, SectionFinished
from diffusers_helper.pipeline.prepare import TransformerPlan
from diffusers_helper.pipeline.request import GenerationRequest


class _Pass(ModelHook):
    def __init__(self, cache, head: bool):
        super().__init__()
        self.cache, self.head = cache, head

    def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
        c = self.cache
        if self.head:  # the first block decides for the whole step
            c.skip_now = c.on and c.step % 2 == 1
            c.step += 1
            c.stats["skipped" if c.skip_now else "computed"] += 1
        if c.skipping():
            return hidden_states, encoder_hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)


class EveryOtherStep(StepCache):
    """Skips the blocks on every second step of a section (a made-up rule: only the interface matters)."""

    name = "every-other"

    def __init__(self, transformer):
        super().__init__()
        self.on, self.step, self.skip_now = False, 0, False
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        for i, block in enumerate(blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_Pass(self, i == 0), "every-other")

    @property
    def enabled(self):
        return self.on

    def configure(self, enabled, threshold=0.0):
        self.on = enabled

    def reset(self, num_steps):
        self.step, self.skip_now = 0, False
        self.stats["computed"] = self.stats["skipped"] = 0

    def skipping(self):
        return self.on and self.skip_now


def test_a_new_cache_drives_the_engine_and_the_streamer(tiny_root, tmp_path, test_image, monkeypatch):
    monkeypatch.setitem(base.STEP_CACHES, "every-other", EveryOtherStep)
    bundle = load_models(tiny_spec("tiny-f1", tiny_root))
    bundle.transformer = build_tiny_transformer(7, num_layers=3, num_single_layers=5).eval().requires_grad_(False)
    placement = Placement(torch.device("cpu"), "swap", probe=lambda: (1 << 20, 0))  # room for no resident block
    engine = Engine(bundle, placement, outputs_dir=tmp_path, plan=TransformerPlan(step_cache="every-other"))
    assert isinstance(engine.step_cache, EveryOtherStep)
    events = []
    final = engine.generate(GenerationRequest(prompt="x", image=test_image, seconds=1.0, steps=6, seed=1,
                                              use_teacache=True, gpu_memory_preservation_gb=0), events.append)
    assert isinstance(final, Finished)
    assert [e.cache_note for e in events if isinstance(e, SectionFinished)] == ["every-other: 3/6 steps computed"]
    streamer = streamer_of(bundle.transformer)
    largest = max(b.nbytes for b in streamer.blocks)
    # a skipped step streams at most the first block and its lookahead; a computed one the whole stack
    assert streamer.resident_count == 0
    assert streamer.bytes_copied <= 3 * streamer.total_bytes + 3 * 3 * largest
    assert streamer.bytes_copied < 6 * streamer.total_bytes
    assert not engine.step_cache.enabled  # off again after the job


def test_no_cache_computes_every_step(tiny_bundles, tmp_path, test_image):
    cache = attach_step_cache(tiny_bundles["tiny"].transformer, "none")
    assert isinstance(cache, NoStepCache)
    cache.configure(True, 0.5)
    assert not cache.enabled and not cache.skipping() and cache.note(5) == ""
