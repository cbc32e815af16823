"""Speed options: backend choice, fallback, regional compile keeps outputs, the bench command."""

import json

import pytest
import torch

from diffusers_helper import bench
from diffusers_helper.speed import (SpeedOptions, apply_speed, choose_attention_backend, compile_blocks,
                                    set_attention_backend)


def test_backend_choice():
    cpu = torch.device("cpu")
    assert choose_attention_backend("standard", "auto", cpu) == "native"
    assert choose_attention_backend("aggressive", "auto", cpu) == "xformers"
    assert choose_attention_backend("off", "auto", cpu) == "native"
    assert choose_attention_backend("standard", "cudnn", cpu) == "cudnn"  # an explicit choice wins


def test_unavailable_backend_falls_back_and_says_so(tiny_bundles, caplog):
    transformer = tiny_bundles["tiny"].transformer
    with caplog.at_level("WARNING"):
        used = set_attention_backend(transformer, "xformers")  # xformers is not installed here
    try:
        assert used == "native" and "Attention backend xformers unavailable" in caplog.text
    finally:
        set_attention_backend(transformer, "native")
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(transformer, "warp-drive")


def test_math_backend_matches_native(tiny_bundles):
    transformer = tiny_bundles["tiny"].transformer
    cond, noise = bench._inputs(transformer, 64, torch.float32, torch.device("cpu"))
    run = bench._forward_fn(transformer, cond, noise, torch.float32, torch.device("cpu"))
    native = run()
    set_attention_backend(transformer, "math")
    try:
        assert (run() - native).abs().max() < 1e-5
    finally:
        set_attention_backend(transformer, "native")


def test_bench_command_on_cpu_with_compile(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--configs", "eager,compile", "--repeats", "1", "--fidelity-steps", "2", "--out", str(out),
                       "--cache-dir", str(tmp_path)]) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["flops_per_forward"] > 0
    eager, compiled = data["configs"]["eager"], data["configs"]["compile"]
    assert eager["forward_s"] > 0 and eager["section_s_25_steps"] == pytest.approx(25 * eager["forward_s"], rel=0.05)
    assert compiled["rel_l2_vs_eager"] < 1e-5  # regional compile is lossless
    assert (tmp_path / "torch_compile").is_dir()  # Inductor caches go to the project cache


def test_apply_speed_reports_what_is_active(tiny_root):
    from diffusers_helper.loading import load_models
    from diffusers_helper.tiny import tiny_spec

    t = load_models(tiny_spec("tiny", tiny_root), parts=["transformer"]).transformer
    active = apply_speed(t, SpeedOptions(attention="math"), torch.device("cpu"))
    assert active == {"attention": "math", "compiled_blocks": 0}
