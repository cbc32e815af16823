"""Memory manager: policy choice, FP8 weight storage, out-of-memory recovery."""

import json

import pytest
import torch

from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.events import Failed, Finished, Stage
from diffusers_helper.models.loading import load_models
from diffusers_helper.accel.weights import model_bytes, store_weights_in_fp8
from diffusers_helper.memory.policy import choose_policy
from diffusers_helper.memory.placement import Placement
from diffusers_helper.pipeline.request import GenerationRequest
from diffusers_helper.models.tiny import tiny_spec


@pytest.mark.parametrize("vram, ram, policy", [
    (79.0, 200.0, "full"),  # an 80 GB card holds everything
    (23.0, 64.0, "swap"),  # a 24 GB card streams the transformer from pinned RAM
    (7.5, 64.0, "swap"),
    (7.5, 32.0, "swap-lowram"),  # too little RAM to pin 26 GB with room to spare
    (90.0, 16.0, "full"),  # VRAM decides first
])
def test_policy_from_free_vram_and_ram(vram, ram, policy):
    choice = choose_policy(vram, ram)
    assert choice.policy == policy and choice.reason
    assert choose_policy(vram, ram, override="swap").policy == "swap"


def test_fp8_storage_halves_weight_memory_and_still_runs(tiny_root, tmp_path, test_image):
    spec = tiny_spec("tiny-f1", tiny_root)
    bundle = load_models(spec)
    t = bundle.transformer
    blocks = sum(model_bytes(b) for b in [*t.transformer_blocks, *t.single_transformer_blocks])
    saved = store_weights_in_fp8(t, torch.float32)
    # the 60 blocks (almost all of the real 13B model) go from 4 to 1 byte per weight; norms and the
    # embedders stay in the compute dtype, as diffusers' casting rules for this class say
    assert saved >= 0.7 * blocks
    engine = Engine(bundle, Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)
    final = engine.generate(GenerationRequest(prompt="x", image=test_image, seconds=1, steps=2), lambda e: None)
    assert isinstance(final, Finished)


class _OomOnce:
    def __init__(self, forward):
        self.forward, self.calls = forward, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.forward(*args, **kwargs)


def test_oom_in_a_section_degrades_placement_and_retries(tiny_root, tmp_path, test_image):
    bundle = load_models(tiny_spec("tiny", tiny_root))
    bundle.transformer.forward = _OomOnce(bundle.transformer.forward)
    engine = Engine(bundle, Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)
    events = []
    final = engine.generate(GenerationRequest(prompt="x", image=test_image, seconds=2.4, steps=2,
                                              cache="none"), events.append)
    assert isinstance(final, Finished) and final.frames == 73
    notes = [e.message for e in events if isinstance(e, Stage) and "Out of GPU memory" in e.message]
    assert notes == ["Out of GPU memory in section 1/2: switched to swap placement, retrying the section"]
    assert engine.placement.policy == "swap"
    assert json.loads(final.sidecar_path.read_text())["oom_recoveries"] == notes


def test_oom_with_nothing_left_to_try_fails_cleanly_and_keeps_sections(tiny_root, tmp_path, test_image):
    bundle = load_models(tiny_spec("tiny", tiny_root))
    engine = Engine(bundle, Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)
    engine.placement.policy = "swap"  # already the most frugal policy
    calls = {"n": 0}
    real = bundle.transformer.forward

    def oom_in_second_section(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # two steps of section 1 succeed
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    bundle.transformer.forward = oom_in_second_section
    final = engine.generate(GenerationRequest(prompt="x", image=test_image, seconds=2.4, steps=2,
                                              cache="none"), lambda e: None)
    assert isinstance(final, Failed) and final.error.startswith("Out of GPU memory")
    assert final.video_path is not None and final.video_path.is_file()  # section 1 was kept


def test_decode_oom_falls_back_to_spatial_tiles(tiny_bundles, monkeypatch):
    from diffusers_helper.vae import decode

    dec = decode.SectionDecoder(tiny_bundles["tiny"].vae)

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(decode, "decode_exact", boom)
    out = dec.decode(torch.randn(1, 16, 3, 6, 8))
    assert out.shape == (1, 3, 9, 48, 64) and dec.last_plan.method == "spatial-tiles"
