"""Streamed transformer blocks: which stay resident, and the streamed model computes exactly the same."""

import pytest
import torch

from conftest import oom_once

from diffusers_helper.memory.block_stream import BlockStreamer, _layout, choose_resident, plan_resident, spread
from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.events import Finished, Stage
from diffusers_helper.memory.placement import Placement, streamer_of
from diffusers_helper.pipeline.request import GenerationRequest
from diffusers_helper.models.loading import load_models
from diffusers_helper.models.tiny import build_tiny_transformer, tiny_spec

MB = 1024**2


def test_spread_is_even():
    assert spread(0, 10) == []
    assert spread(1, 10) == [5]
    assert spread(2, 10) == [2, 7]
    assert spread(10, 10) == list(range(10))


def test_largest_blocks_stay_resident_first():
    sizes = [680] * 4 + [283] * 8  # the real stack's ratio of dual to single block sizes
    assert choose_resident(sizes, 680 * 2) == {1, 3}  # two dual blocks, spread over the four
    assert choose_resident(sizes, 680 * 4 + 283 * 2) == {0, 1, 2, 3, 6, 10}
    assert choose_resident(sizes, 100) == set()


def test_plan_leaves_room_for_the_ring_of_slots():
    sizes = [680] * 4 + [283] * 8
    assert plan_resident(sizes, sum(sizes), slots=3) == set(range(12))  # all fit: no ring needed
    # streaming only single blocks needs a ring of 3 x 283, so all four dual blocks fit
    plan = plan_resident(sizes, 680 * 4 + 3 * 283 + 283, slots=3)
    assert {0, 1, 2, 3} <= plan and len(plan) == 5
    # too little even for that: stream dual blocks too, through a ring of 3 x 680
    assert plan_resident(sizes, 3 * 680 + 300, slots=3) == {8}  # the middle single block
    assert plan_resident(sizes, 1000, slots=3) == set()


def _deep_bundle(root):
    """The tiny model with more blocks (3 dual, 5 single), so the ring of slots has to wrap; loaded fresh,
    since placement hooks stay on the models."""
    bundle = load_models(tiny_spec("tiny-f1", root))
    bundle.transformer = build_tiny_transformer(7, num_layers=3, num_single_layers=5).eval().requires_grad_(False)
    return bundle


@pytest.fixture
def deep_bundle(tiny_root):
    return _deep_bundle(tiny_root)


def _run(bundle, placement, tmp_path, encoded_frames, test_image, **kw):
    engine = Engine(bundle, placement, outputs_dir=tmp_path)
    events = []
    request = GenerationRequest(**{**dict(prompt="a cat", image=test_image, seconds=1.0, steps=3, seed=3,
                                          gpu_memory_preservation_gb=0), **kw})
    final = engine.generate(request, events.append)
    assert isinstance(final, Finished), final
    return encoded_frames(final), engine, events


@pytest.mark.parametrize("budget_blocks", [0, 1, 2])
def test_streamed_blocks_give_identical_video(deep_bundle, tiny_root, tmp_path, encoded_frames, test_image,
                                              budget_blocks):
    reference, _, _ = _run(_deep_bundle(tiny_root), Placement(torch.device("cpu"), "full"), tmp_path / "a",
                           encoded_frames, test_image, cache="none")
    t = deep_bundle.transformer
    block = _layout(t.transformer_blocks[0])[1]  # the largest block, as laid out for copying
    other = sum(p.numel() * p.element_size() for n, c in t.named_children()
                if not n.endswith("transformer_blocks") for p in c.parameters())
    free = other + budget_blocks * block + 3 * block + 4096  # room for some blocks and the ring of slots
    placement = Placement(torch.device("cpu"), "swap", probe=lambda: (free, 0))
    frames, engine, _ = _run(deep_bundle, placement, tmp_path / "b", encoded_frames, test_image, cache="none")
    streamer = streamer_of(deep_bundle.transformer)
    assert (streamer.resident_count > 0) == (budget_blocks > 0)
    assert streamer.resident_count < len(streamer.blocks) and streamer.bytes_copied > 0  # some were streamed
    streamer.activate(free)  # the engine released it after the job; what it holds must fit the budget
    assert streamer.gpu_bytes <= free
    # exact: the same kernels on the same weights, aligned in both (the streamer's slots to 512 bytes)
    assert torch.equal(torch.from_numpy(frames), torch.from_numpy(reference))


def test_teacache_skipped_steps_move_no_blocks(deep_bundle, tmp_path, encoded_frames, test_image):
    placement = Placement(torch.device("cpu"), "swap", probe=lambda: (1 * MB, 0))
    _, engine, _ = _run(deep_bundle, placement, tmp_path, encoded_frames, test_image, cache="teacache",
                        teacache_threshold=1.0, steps=8)
    streamer = streamer_of(deep_bundle.transformer)
    stats = engine.step_caches.totals()
    assert streamer.resident_count == 0 and stats["skipped"] > 0
    total = streamer.total_bytes
    largest = max(b.nbytes for b in streamer.blocks)
    # a computed step streams the whole stack; a skipped one at most the first block and its lookahead
    assert streamer.bytes_copied <= stats["computed"] * total + stats["skipped"] * 3 * largest
    assert streamer.bytes_copied < (stats["computed"] + stats["skipped"]) * total


def test_running_before_placement_says_so(deep_bundle):
    model = deep_bundle.transformer
    streamer = BlockStreamer(model, [model.transformer_blocks, model.single_transformer_blocks],
                             torch.device("cpu"))
    with pytest.raises(RuntimeError, match="call activate"):
        model.transformer_blocks[0](torch.zeros(1, 4, 32), torch.zeros(1, 2, 32), torch.zeros(1, 32))
    streamer.close()
    assert not model.transformer_blocks[0]._forward_pre_hooks


def test_oom_under_swap_keeps_fewer_blocks_resident(deep_bundle, tmp_path, encoded_frames, test_image):
    placement = Placement(torch.device("cpu"), "swap", probe=lambda: (1 << 40, 0))
    engine = Engine(deep_bundle, placement, outputs_dir=tmp_path)
    oom_once(deep_bundle.transformer, {})
    events = []
    final = engine.generate(GenerationRequest(prompt="x", image=test_image, seconds=1.0, steps=2,
                                              cache="none", gpu_memory_preservation_gb=0), events.append)
    assert isinstance(final, Finished)
    notes = [e.message for e in events if isinstance(e, Stage) and "Out of GPU memory" in e.message]
    streamer = streamer_of(deep_bundle.transformer)
    kept = streamer.resident_count
    assert notes == [f"Out of GPU memory in section 1/1: kept {kept} transformer blocks on the GPU instead of 8, "
                     "retrying the section"]
    assert 0 < kept < 8 and placement.resident_cap <= streamer.total_bytes // 2


def test_fp8_weight_storage_streams_the_fp8_bytes(tiny_root, tmp_path, encoded_frames, test_image):
    from diffusers_helper.accel.weights import store_weights_in_fp8

    frames = {}
    for policy in ("full", "swap"):
        bundle = _deep_bundle(tiny_root)
        store_weights_in_fp8(bundle.transformer, torch.float32)
        placement = Placement(torch.device("cpu"), policy, probe=lambda: (0, 0))
        frames[policy], engine, _ = _run(bundle, placement, tmp_path / policy, encoded_frames, test_image,
                                         cache="none")
    streamer = streamer_of(bundle.transformer)
    fp32 = _deep_bundle(tiny_root).transformer
    fp32_bytes = sum(_layout(b)[1] for b in [*fp32.transformer_blocks, *fp32.single_transformer_blocks])
    matrices = [p for b in streamer.blocks for n, p in b.module.named_parameters() if p.dim() == 2 and "norm" not in n]
    assert streamer.resident_count == 0 and all(p.dtype == torch.float8_e4m3fn for p in matrices)
    assert streamer.total_bytes < 0.6 * fp32_bytes  # the tiny model's many small norms and biases stay fp32
    assert torch.equal(torch.from_numpy(frames["swap"]), torch.from_numpy(frames["full"]))


def test_switching_models_unhooks_the_streamed_transformer(tiny_root, tmp_path, monkeypatch):
    """The provider releases a streamed transformer before dropping it (its pinned buffers must be unregistered
    while they are still alive)."""
    from diffusers_helper.app.service import EngineProvider
    import diffusers_helper.app.service as service_module

    provider = EngineProvider(models_dir=str(tiny_root), offline=True, outputs_dir=tmp_path, placement="swap")
    monkeypatch.setattr(service_module.Placement, "choose", classmethod(
        lambda cls, device, override=None, devices=None: cls(device, "swap", probe=lambda: (0, 0))))
    first = provider.get("tiny").bundle.transformer
    streamer = streamer_of(first)
    assert streamer is not None and streamer.blocks[0].module._forward_pre_hooks
    provider.get("tiny-f1")
    assert streamer_of(first) is None and not streamer._hooks  # unhooked and unpinned before being dropped
