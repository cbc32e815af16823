"""Each performance/memory control changes what the engine does."""

import dataclasses
import logging

import pytest
import torch

from conftest import FakeBundle, FakeModel
from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.events import Failed, Finished
from diffusers_helper.models.loading import load_models
from diffusers_helper.memory.placement import MemoryPolicy, Placement
from diffusers_helper.pipeline.request import GenerationRequest
from diffusers_helper.pipeline.sampling import Guidance, sample_section
from diffusers_helper.models.tiny import tiny_spec

GB = 1024**3


@pytest.fixture
def swap(monkeypatch):
    import diffusers_helper.memory.placement as placement_module

    monkeypatch.setattr(placement_module, "model_bytes", lambda m: m.size)
    monkeypatch.setattr(placement_module, "_on_device", lambda m, d: m.on != "cpu")
    state = {"free": 10 * GB, "used": 4 * GB}
    placement = Placement(torch.device("cpu"), "swap", probe=lambda: (state["free"], state["used"]))
    return placement, state


def test_swap_offloads_other_models_by_default(swap):
    placement, _ = swap
    bundle = FakeBundle(vae=FakeModel(1), image_encoder=FakeModel(1), text_encoder_2=FakeModel(0.5))
    bundle.models()["image_encoder"].on = "cuda"
    placement.memory = MemoryPolicy()
    assert placement.use(bundle, "vae") == ["image_encoder"]
    assert bundle.models()["vae"].on == "cpu" and bundle.models()["image_encoder"].on == "cpu"


def test_keep_models_in_gpu_never_offloads(swap):
    placement, _ = swap
    bundle = FakeBundle(vae=FakeModel(1), image_encoder=FakeModel(1))
    bundle.models()["image_encoder"].on = "cuda"
    placement.memory = MemoryPolicy(keep_loaded=True)
    assert placement.use(bundle, "vae") == []
    assert bundle.models()["image_encoder"].on == "cuda"


def test_cpu_offload_threshold_and_preservation(swap):
    placement, state = swap
    bundle = FakeBundle(vae=FakeModel(1), image_encoder=FakeModel(1))
    bundle.models()["image_encoder"].on = "cuda"
    # 4 GB used + 1 GB needed stays under an 8 GB threshold, and 10 - 1 GB free stays above 6 GB preserved
    placement.memory = MemoryPolicy(offload_threshold_gb=8, preserve_gb=6)
    assert placement.use(bundle, "vae") == []
    # the same with 10 GB to preserve: now the image encoder has to go
    bundle.models()["vae"].on = "cpu"
    placement.memory = MemoryPolicy(offload_threshold_gb=8, preserve_gb=10)
    assert placement.use(bundle, "vae") == ["image_encoder"]
    # or with a 4 GB threshold
    bundle.models()["vae"].on, bundle.models()["image_encoder"].on = "cpu", "cuda"
    placement.memory = MemoryPolicy(offload_threshold_gb=4, preserve_gb=0)
    assert placement.use(bundle, "vae") == ["image_encoder"]


def _req(image, **kw):
    base = dict(prompt="a cat", image=image, seconds=1.0, steps=2, cache="none")
    base.update(kw)
    return GenerationRequest(**base)


def test_engine_applies_job_controls(tiny_bundles, tmp_path, test_image, caplog):
    engine = Engine(tiny_bundles["tiny"], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)
    assert isinstance(engine.generate(_req(test_image), lambda e: None), Finished)
    base_budget = engine.decoder.last_plan.chunk_budget_bytes
    with caplog.at_level(logging.INFO):
        final = engine.generate(_req(test_image, aggressive_gpu=True, chunk_size_multiplier=1.5, vae_attention_tokens=4096,
                                     keep_models_in_gpu=True, cpu_offload_threshold_gb=7,
                                     gpu_memory_preservation_gb=8), lambda e: None)
    assert isinstance(final, Finished)
    assert "Aggressive mode: Larger chunks and higher memory utilization enabled" in caplog.text
    assert engine.decoder.options.chunk_multiplier == 3.0 and engine.decoder.options.max_attention_tokens == 4096
    assert engine.decoder.last_plan.chunk_budget_bytes == 3 * base_budget
    assert engine.placement.memory == MemoryPolicy(keep_loaded=True, offload_threshold_gb=7, preserve_gb=4)


def test_mixed_precision_switches_the_transformer_dtype(tiny_root, tmp_path, test_image):
    spec = tiny_spec("tiny-f1", tiny_root)
    spec = dataclasses.replace(spec, transformer=dataclasses.replace(spec.transformer, dtype=torch.bfloat16))
    bundle = load_models(spec)
    engine = Engine(bundle, Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)
    assert engine.dtype == torch.bfloat16
    assert isinstance(engine.generate(_req(test_image, mixed_precision=False), lambda e: None), Finished)
    assert engine.dtype == torch.float32 and bundle.transformer.dtype == torch.float32
    assert isinstance(engine.generate(_req(test_image, mixed_precision=True), lambda e: None), Finished)
    assert bundle.transformer.dtype == torch.bfloat16


def test_mixed_precision_off_needs_full_placement(tiny_root, tmp_path, test_image):
    spec = tiny_spec("tiny-f1", tiny_root)
    spec = dataclasses.replace(spec, transformer=dataclasses.replace(spec.transformer, dtype=torch.bfloat16))
    engine = Engine(load_models(spec), Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)
    engine.placement.policy = "swap"
    final = engine.generate(_req(test_image, mixed_precision=False), lambda e: None)
    assert isinstance(final, Failed) and "needs every model on the GPU" in final.error


class _Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, **kw):
        self.batches.append(kw["hidden_states"].shape[0])
        return self.inner(**kw)


def test_batch_processing_runs_cfg_branches_together(tiny_bundles, test_image):
    from diffusers_helper.pipeline.sections import SectionSchedule

    t = _Counting(tiny_bundles["tiny-f1"].transformer)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1, 16, 1, 6, 8, generator=g)
    section = SectionSchedule("f1", start, 1, 3).inputs(0).to_kwargs(torch.device("cpu"), torch.float32)

    def cond(seed, n):
        gen = torch.Generator().manual_seed(seed)
        mask = torch.zeros(1, 512, dtype=torch.bool)
        mask[:, :n] = True
        return {"encoder_hidden_states": torch.randn(1, 512, 32, generator=gen) * mask[..., None],
                "encoder_attention_mask": mask, "pooled_projections": torch.randn(1, 16, generator=gen),
                "image_embeds": torch.randn(1, 9, 24, generator=gen), **section}

    noise = torch.randn(1, 16, 3, 6, 8, generator=g)
    args = dict(noise=noise, steps=3, positive=cond(1, 7), negative=cond(2, 5), dtype=torch.float32,
                device=torch.device("cpu"))
    with torch.inference_mode():
        seq = sample_section(t, guidance=Guidance(cfg=3.0, batch=False), **args)
        seq_batches, t.batches = t.batches, []
        bat = sample_section(t, guidance=Guidance(cfg=3.0, batch=True), **args)
    assert seq_batches == [1, 1] * 3 and t.batches == [2] * 3
    assert (seq - bat).abs().max() < 1e-4 * seq.abs().max()
