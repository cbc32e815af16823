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
    assert active == {"attention": "math", "fp8_linears": 0, "compiled_blocks": 0}


def test_fp8_linear_close_to_the_original():
    from diffusers_helper.fp8 import FP8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    f = FP8Linear(lin)
    assert f.weight.dtype == torch.float8_e4m3fn and f.weight.element_size() == 1
    err = ((f(x) - lin(x)).norm() / lin(x).norm()).item()
    assert 0 < err < 0.05  # e4m3 weights: a few percent per layer, never exact


def test_fp8_conversion_scope_and_fidelity(tiny_root):
    from diffusers_helper.fp8 import FP8Linear, convert_to_fp8
    from diffusers_helper.loading import load_models
    from diffusers_helper.tiny import tiny_spec

    t = load_models(tiny_spec("tiny", tiny_root), parts=["transformer"]).transformer
    cond, noise = bench._inputs(t, 64, torch.float32, torch.device("cpu"))
    run = bench._forward_fn(t, cond, noise, torch.float32, torch.device("cpu"))
    ref = run()
    n = convert_to_fp8(t)
    fp8_names = [name for name, m in t.named_modules() if isinstance(m, FP8Linear)]
    assert n == len(fp8_names) > 0
    assert all(name.startswith(("transformer_blocks", "single_transformer_blocks")) for name in fp8_names)
    assert not any("norm" in name for name in fp8_names)  # modulation linears stay in the compute dtype
    err = ((run() - ref).norm() / ref.norm()).item()
    assert err < 0.01  # stated tolerance: under 1% of the output
    t2 = load_models(tiny_spec("tiny", tiny_root), parts=["transformer"]).transformer
    assert convert_to_fp8(t2, target_keys=("attn",)) < n  # target keys narrow the set
