"""Step caches: each skips by its own rule, resets per section, is lossless at threshold 0, spares streamed
weights on skipped steps, and a cache the engine has never heard of plugs in by name."""

import json

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

from diffusers_helper.caches import base
from diffusers_helper.caches.base import CacheSettings, StepCache, register_step_cache
from diffusers_helper.caches.magcache import interpolate
from diffusers_helper.config.job import CACHE_NAMES
from diffusers_helper.memory.placement import Placement, streamer_of
from diffusers_helper.models.loading import load_models
from diffusers_helper.models.tiny import build_tiny_transformer, tiny_spec
from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.events import Finished, SectionFinished
from diffusers_helper.pipeline.prepare import TransformerPlan
from diffusers_helper.pipeline.request import GenerationRequest

MB = 1 << 20


def _deep(tiny_root):
    bundle = load_models(tiny_spec("tiny-f1", tiny_root))
    bundle.transformer = build_tiny_transformer(7, num_layers=3, num_single_layers=5).eval().requires_grad_(False)
    return bundle


def _run(engine, image, **kw):
    notes = []
    kw = {"prompt": "x", "image": image, "seconds": 2.4, "steps": 8, "seed": 3, "gpu_memory_preservation_gb": 0, **kw}
    final = engine.generate(GenerationRequest(**kw), lambda e: notes.append(e.cache_note)
                            if isinstance(e, SectionFinished) else None)
    assert isinstance(final, Finished), final
    return final, notes, json.loads(final.sidecar_path.read_text())


@pytest.fixture(scope="module")
def cpu_engine(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("caches")
    plan = TransformerPlan(cache_store=str(out / "store"))
    return Engine(_deep(tiny_root), Placement(torch.device("cpu"), "full"), outputs_dir=out, plan=plan)


def test_magcache_rule_hand_computed(cpu_engine, test_image):
    # ratios for 6 steps, no retention, threshold 0.1, K 2:
    # step 0 computes (nothing cached); 1: ratio 1, error 0 -> skip; 2: ratio .95, error .05 -> skip (2nd in a row);
    # 3: ratio .855, error .195 -> compute, reset; 4: ratio 1, error 0 -> skip; 5: ratio 1.2, error .2 -> compute
    store = cpu_engine.plan.cache_store
    path = __import__("pathlib").Path(store) / "magcache" / "tiny-f1.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"64": {"6": [1.0, 1.0, 0.95, 0.9, 1.0, 1.2]}}))
    try:
        _, notes, record = _run(cpu_engine, test_image, steps=6, cache="magcache", magcache_threshold=0.1,
                                magcache_max_skips=2, magcache_retention=0.0)
    finally:
        path.unlink()
    sections = record["step_cache"]["sections"]
    assert len(sections) == 2 and all(s["steps_computed"] == [0, 3, 5] for s in sections)  # reset per section
    assert notes == ["MagCache: 3/6 steps computed"] * 2
    assert "calibrated for this model" in record["step_cache"]["description"]
    assert record["step_cache"]["settings"] == {"magcache_threshold": 0.1, "magcache_max_skips": 2,
                                                "magcache_retention": 0.0, "magcache_calibrate": False}


def test_magcache_published_ratios_and_calibration(cpu_engine, test_image, encoded_frames):
    assert interpolate([1.0, 2.0, 3.0], 5) == [1.0, 1.5, 2.0, 2.5, 3.0]
    plain, _, _ = _run(cpu_engine, test_image, cache="none")
    final, notes, record = _run(cpu_engine, test_image, cache="magcache", magcache_calibrate=True)
    assert notes == ["MagCache: 8/8 steps computed"] * 2  # calibration skips nothing
    assert np.array_equal(encoded_frames(plain), encoded_frames(final))
    saved = json.loads((__import__("pathlib").Path(cpu_engine.plan.cache_store) / "magcache" / "tiny-f1.json")
                       .read_text())
    ratios = saved["64"]["8"]
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    _, _, record = _run(cpu_engine, test_image, cache="magcache")
    assert "calibrated for this model, 64 bucket, 8 steps" in record["step_cache"]["description"]
    (__import__("pathlib").Path(cpu_engine.plan.cache_store) / "magcache" / "tiny-f1.json").unlink()
    _, _, record = _run(cpu_engine, test_image, cache="magcache")
    assert "published FramePack-F1, 128 bucket, 25 steps" in record["step_cache"]["description"]


@pytest.mark.parametrize("cache, knob, lossless, skipping, computed", [
    ("teacache", "teacache_threshold", 0.0, 1.0, [0, 7]),  # first and last always compute
    ("magcache", "magcache_threshold", 0.0, 1.0, None),
    ("fbcache", "fbcache_threshold", 0.0, 1.0, None),
    ("taylorseer", "taylorseer_interval", 1, 4, [0, 1, 2, 4]),  # 3 warm-up steps, then one in 4
])
def test_each_cache_skips_resets_and_is_lossless_at_zero(cpu_engine, test_image, encoded_frames, cache, knob,
                                                         lossless, skipping, computed):
    plain, _, _ = _run(cpu_engine, test_image, cache="none")
    zero, notes, _ = _run(cpu_engine, test_image, cache=cache, **{knob: lossless})
    assert all(n.endswith("8/8 steps computed") for n in notes)
    assert np.array_equal(encoded_frames(plain), encoded_frames(zero))
    _, notes, record = _run(cpu_engine, test_image, cache=cache, **{knob: skipping})
    sections = record["step_cache"]["sections"]
    assert record["step_cache"]["name"] == cache and all(s["skipped"] > 0 for s in sections)
    assert sections[0]["steps_computed"] == sections[1]["steps_computed"]  # every section starts afresh
    if computed is not None:
        assert sections[0]["steps_computed"] == computed
    assert not cpu_engine.step_caches.enabled  # off again after the job: the hooks only pass through


@pytest.mark.parametrize("cache, knob, value", [("teacache", "teacache_threshold", 1.0),
                                                ("magcache", "magcache_threshold", 1.0),
                                                ("fbcache", "fbcache_threshold", 1.0),
                                                ("taylorseer", "taylorseer_interval", 4)])
def test_skipped_steps_move_no_streamed_blocks(tiny_root, tmp_path, test_image, cache, knob, value):
    placement = Placement(torch.device("cpu"), "swap", probe=lambda: (1 * MB, 0))  # room for no resident block
    bundle = _deep(tiny_root)
    engine = Engine(bundle, placement, outputs_dir=tmp_path)
    _run(engine, test_image, cache=cache, seconds=1.0, **{knob: value})  # one section: the probe's 1 MB stays true
    streamer, stats = streamer_of(bundle.transformer), engine.step_caches.totals()
    assert streamer.resident_count == 0 and stats["skipped"] > 0
    largest = max(b.nbytes for b in streamer.blocks)
    # a computed step streams the whole stack; a skipped one at most the first block and its lookahead
    assert streamer.bytes_copied <= stats["computed"] * streamer.total_bytes + stats["skipped"] * 3 * largest


class _Pass(ModelHook):
    def __init__(self, cache, head: bool):
        super().__init__()
        self.cache, self.head = cache, head

    def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
        c = self.cache
        if self.head and c.enabled:  # the first block decides for the whole step
            c.skip_now = c.step % 2 == 1
            c.count(c.step, not c.skip_now)
            c.step += 1
        if c.skipping():
            return hidden_states, encoder_hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)


class EveryOtherStep(StepCache):
    """Skips the blocks on every second step of a section (a made-up rule: only the interface matters)."""

    name = "every-other"

    def __init__(self, transformer):
        super().__init__()
        self.step, self.skip_now = 0, False
        for i, block in enumerate([*transformer.transformer_blocks, *transformer.single_transformer_blocks]):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_Pass(self, i == 0), "every-other")

    def configure(self, settings: CacheSettings, context) -> str:
        return "every other step"

    def reset(self, num_steps):
        self.step, self.skip_now = 0, False

    def skipping(self):
        return self.enabled and self.skip_now


def test_a_new_cache_drives_the_engine_and_the_streamer(tiny_root, tmp_path, test_image, monkeypatch):
    monkeypatch.setattr(base, "STEP_CACHES", dict(base.STEP_CACHES))
    monkeypatch.setattr(base, "CACHE_NAMES", CACHE_NAMES)
    register_step_cache("every-other", EveryOtherStep)
    try:
        bundle = _deep(tiny_root)
        placement = Placement(torch.device("cpu"), "swap", probe=lambda: (1 << 20, 0))
        engine = Engine(bundle, placement, outputs_dir=tmp_path, plan=TransformerPlan(step_caches=("every-other",)))
        assert engine.step_caches.names == ["none", "every-other"]
        _, notes, record = _run(engine, test_image, seconds=1.0, steps=6, cache="every-other")
        assert notes == ["every-other: 3/6 steps computed"]
        assert record["step_cache"]["sections"] == [{"computed": 3, "skipped": 3, "steps_computed": [0, 2, 4]}]
        streamer = streamer_of(bundle.transformer)
        largest = max(b.nbytes for b in streamer.blocks)
        assert streamer.bytes_copied <= 3 * streamer.total_bytes + 3 * 3 * largest < 6 * streamer.total_bytes
        assert not engine.step_caches.enabled
        with pytest.raises(ValueError, match="step cache 'teacache' is not available here"):
            engine.step_caches.select(CacheSettings.of(cache="teacache"))
    finally:
        CACHE_NAMES.remove("every-other")
