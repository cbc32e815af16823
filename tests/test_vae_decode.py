"""The exact layer-wise VAE decode, its planner, the decoder backends and the TensorRT fallback."""

import threading

import pytest
import torch
import torch.nn.functional as F

from diffusers_helper.vae import plan as vae_plan
from diffusers_helper.vae.decode import SectionDecoder, vae_decode
from diffusers_helper.vae.chunked import LayerwiseDecoder, decode_exact
from diffusers_helper.vae.plan import DecodeOptions, plan_decode
from diffusers_helper.vae.trt import TensorRTTileDecoder

TOL = 1e-4  # float32 rounding; outputs are O(1)


@pytest.fixture(scope="module")
def vae(tiny_bundles):
    return tiny_bundles["tiny"].vae


def _z(frames, seed=0, h=6, w=8):
    return torch.randn(1, 16, frames, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("budget", [1, 10**9])  # one frame per chunk, or the whole tile at once
def test_layerwise_tile_equals_untiled_decoder(vae, frames, budget):
    z = _z(frames)
    with torch.no_grad():
        ref = vae.decoder(vae.post_quant_conv(z))
        out = LayerwiseDecoder(vae, budget).decode_tile(z)
    assert out.shape == ref.shape == (1, 3, 4 * (frames - 1) + 1, 48, 64)
    assert (out - ref).abs().max() < TOL


@pytest.mark.parametrize("frames", [10, 19])
def test_exact_decode_equals_stock_vae_decode(vae, frames):
    z = _z(frames, seed=frames)
    with torch.no_grad():
        ref = vae.decode(z).sample  # diffusers' own temporal tiles, as the original calls it
        out = decode_exact(vae, z, chunk_budget_bytes=1)
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err < TOL, err


def test_attention_query_chunks_do_not_change_the_result(vae):
    z = _z(5, seed=3)
    with torch.no_grad():
        a = LayerwiseDecoder(vae, 10**9, max_attention_tokens=48).decode_tile(z)
        b = LayerwiseDecoder(vae, 10**9, max_attention_tokens=7).decode_tile(z)  # 48 tokens per frame / 7
    assert (a - b).abs().max() < TOL


def test_quality_mode_whole_section_equals_untiled_decoder(vae):
    z = _z(10, seed=4)
    with torch.no_grad():
        untiled = vae.decoder(vae.post_quant_conv(z))
        quality = decode_exact(vae, z, tile_latents=10)
        stock = vae.decode(z).sample
    assert (quality - untiled).abs().max() < TOL
    assert (stock - untiled).abs().max() > 1e-3  # the stock tiles really do differ: Quality Mode changes output


class _FakeVae:
    """Just what the planner reads, sized like the real HunyuanVideo VAE in fp16."""

    class config:
        block_out_channels = (128, 256, 512, 512)

    dtype = torch.float16
    temporal_compression_ratio = 4
    tile_sample_min_num_frames = 16
    device = torch.device("cpu")


GB = 1024**3


def test_plan_real_size_640():
    vae = _FakeVae()
    opts = DecodeOptions()
    full = plan_decode(vae, 19, 640, 640, opts, quality=False, free=80 * GB)
    assert full.method == "layerwise" and full.tile_latents is None
    small = plan_decode(vae, 19, 640, 640, DecodeOptions(reserve_gb=0), quality=False, free=6 * GB)
    assert small.method == "layerwise"  # the stock tiles fit 6 GB layer by layer (~4.5 GB estimated)
    assert vae_plan.tile_peak_bytes(vae, 5, 640, 640, small.chunk_budget_bytes) < 5 * GB
    starved = plan_decode(vae, 19, 640, 640, opts, quality=False, free=int(2.5 * GB))
    assert starved.method == "spatial-tiles" and "not exact" in starved.reason
    q_big = plan_decode(vae, 19, 640, 640, opts, quality=True, free=80 * GB)
    assert q_big.tile_latents == 19 and "whole section" in q_big.reason
    q_mid = plan_decode(vae, 19, 640, 640, opts, quality=True, free=16 * GB)
    assert q_mid.method == "layerwise" and 4 < q_mid.tile_latents < 19
    q_small = plan_decode(vae, 19, 640, 640, opts, quality=True, free=6 * GB)
    assert q_small.tile_latents is None  # Quality Mode falls back to the stock tiles when nothing larger fits


def test_plan_chunk_settings():
    vae = _FakeVae()
    fixed = plan_decode(vae, 19, 640, 640, DecodeOptions(chunk_size=1), quality=False, free=80 * GB)
    frame = vae_plan.full_res_frame_bytes(vae, 640, 640)
    assert fixed.chunk_budget_bytes == 4 * frame * 4 and "FRAMEPACK_VAE_CHUNK_SIZE" in fixed.reason
    base = plan_decode(vae, 19, 640, 640, DecodeOptions(), quality=False, free=80 * GB)
    double = plan_decode(vae, 19, 640, 640, DecodeOptions(chunk_multiplier=2.0), quality=False, free=80 * GB)
    assert double.chunk_budget_bytes == 2 * base.chunk_budget_bytes
    tight = plan_decode(vae, 19, 640, 640, DecodeOptions(reserve_gb=5.0), quality=False, free=6 * GB)
    assert tight.method == "spatial-tiles"  # the reserve counts


@pytest.mark.parametrize("backend", ["exact", "stock"])
def test_section_decoder_backends_match_the_original_decode(vae, backend):
    z = _z(10, seed=5) * vae.config.scaling_factor
    ref = vae_decode(z, vae)
    out = SectionDecoder(vae, DecodeOptions(backend=backend)).decode(z)
    assert (out - ref).abs().max() < TOL


def test_spatial_tiles_when_memory_is_short(vae, monkeypatch):
    monkeypatch.setattr(vae_plan, "free_bytes", lambda device: 0)
    dec = SectionDecoder(vae, DecodeOptions(reserve_gb=0))
    out = dec.decode(_z(5, seed=6))
    assert dec.last_plan.method == "spatial-tiles" and out.shape == (1, 3, 17, 48, 64)
    assert vae.use_tiling is False  # restored afterwards


def test_tensorrt_missing_falls_back_to_exact(vae, caplog):
    z = _z(10, seed=7) * vae.config.scaling_factor
    dec = SectionDecoder(vae, DecodeOptions(backend="tensorrt"))
    with caplog.at_level("WARNING"):
        out = dec.decode(z)
    assert (out - vae_decode(z, vae)).abs().max() < TOL
    assert dec._trt.disabled_reason and "torch-tensorrt unavailable" in caplog.text
    assert dec._trt.stats["tensorrt"] == 0 and dec._trt.stats["fallback"] > 0


def test_tensorrt_engine_cache_per_shape_and_thread_safe(vae, tmp_path):
    builds = []
    gate = threading.Event()

    def build(module, example, workspace_mb, aux, path):
        builds.append(tuple(example.shape))
        gate.wait(1.0)  # hold the lock so concurrent callers pile up on it
        return lambda z: module(z) + 0  # "engine": the same module

    trt = TensorRTTileDecoder(vae, fallback=lambda z: None, cache_dir=tmp_path, build=build)
    z = _z(5, seed=8)
    results = []
    threads = [threading.Thread(target=lambda: results.append(trt(z))) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    trt(_z(3, seed=9))
    assert builds == [(1, 16, 5, 6, 8), (1, 16, 3, 6, 8)]  # one build per shape despite 4 threads
    assert trt.stats == {"tensorrt": 5, "fallback": 0} and len(results) == 4


def test_tensorrt_build_and_runtime_failures_fall_back(vae, tmp_path):
    exact = LayerwiseDecoder(vae).decode_tile
    trt = TensorRTTileDecoder(vae, fallback=exact, cache_dir=tmp_path,
                              build=lambda *a: (_ for _ in ()).throw(RuntimeError("no builder")))
    z = _z(5, seed=10)
    assert torch.allclose(trt(z), exact(z)) and trt.stats["fallback"] == 1
    trt(z)  # a failed shape is not rebuilt
    assert len(trt.failed) == 1 and trt.stats["fallback"] == 2

    def broken_engine(*a):
        def run(z):
            raise RuntimeError("engine crashed")
        return run

    trt2 = TensorRTTileDecoder(vae, fallback=exact, cache_dir=tmp_path, build=broken_engine)
    assert torch.allclose(trt2(z), exact(z)) and trt2.stats == {"tensorrt": 0, "fallback": 1}
    assert not trt2.engines


def test_quality_mode_job(tiny_bundles, tmp_path, test_image):
    from diffusers_helper.pipeline.engine import Engine
    from diffusers_helper.pipeline.events import Finished
    from diffusers_helper.memory.placement import Placement
    from diffusers_helper.pipeline.request import GenerationRequest

    engine = Engine(tiny_bundles["tiny-f1"], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)
    final = engine.generate(GenerationRequest(prompt="x", image=test_image, seconds=2.4, steps=2,
                                              quality_mode=True), lambda e: None)
    assert isinstance(final, Finished) and final.frames == 73
    assert "Quality Mode" in engine.decoder.last_plan.reason


@pytest.mark.parametrize("pad", [(1, 1, 1, 1, 2, 0), (1, 1, 0, 1, 2, 0), (1, 1, 1, 0, 2, 0), (0, 0, 0, 0, 1, 1),
                                 (2, 0, 3, 1, 0, 2)])
def test_replicate_pad_equals_torch(pad):
    """The slice-copy pad gives F.pad(replicate)'s values exactly, alone and with the norm + SiLU fused in."""
    from diffusers_helper.vae.chunked import _replicate_pad

    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 5, 6, dtype=torch.float16)
    assert torch.equal(_replicate_pad(x, pad), F.pad(x, pad, mode="replicate"))
    a, b = torch.rand(1, 3, 1, 1, 1) + 0.5, torch.randn(1, 3, 1, 1, 1)
    normed = F.silu(x.float() * a + b).to(x.dtype)
    assert torch.equal(_replicate_pad(x, pad, (a, b)), F.pad(normed, pad, mode="replicate"))
