"""Speed options: backend choice, fallback, regional compile keeps outputs, the bench command."""

import json

import pytest
import torch

from diffusers_helper import bench
from diffusers_helper.accel.attention import AttentionConfig, choose_attention_backend, set_attention_backend


def test_backend_choice():
    assert choose_attention_backend("standard", "auto") == "native"
    assert choose_attention_backend("aggressive", "auto") == "xformers"
    assert choose_attention_backend("off", "auto") == "native"
    assert choose_attention_backend("standard", "cudnn") == "cudnn"  # an explicit choice wins


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
    assert compiled["rel_l2_forward"] < 1e-5 and compiled["rel_l2_section"] < 1e-5  # regional compile is lossless
    assert "rel_l2_forward" not in eager  # the reference row compares with nothing
    assert (tmp_path / "torch_compile").is_dir()  # Inductor caches go to the project cache


def test_prepare_reports_each_step_in_the_declared_order(tiny_root, tmp_path, test_image):
    from diffusers_helper.accel.compile import CompileConfig
    from diffusers_helper.config.formats import WeightFormat
    from diffusers_helper.memory.placement import Placement
    from diffusers_helper.models.loading import load_models
    from diffusers_helper.models.tiny import tiny_spec
    from diffusers_helper.pipeline.engine import Engine
    from diffusers_helper.pipeline.prepare import TransformerPlan
    from diffusers_helper.pipeline.request import GenerationRequest

    bundle = load_models(tiny_spec("tiny", tiny_root))
    plan = TransformerPlan(weights=WeightFormat("fp8"), compile=CompileConfig(enabled=True, cache_dir=str(tmp_path)),
                           attention=AttentionConfig(backend="math"))
    engine = Engine(bundle, Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path, plan=plan)
    report = engine.report
    assert [s.step for s in report.steps] == ["weights", "compile", "context_parallel", "step_caches", "placement",
                                          "attention"]
    fp8 = report["weights"].details["fp8_linears"]
    assert fp8 > 0 and report["compile"].details["compiled_blocks"] == 2 and report["attention"].summary == "math"
    assert report.to_record()["step_caches"].startswith("teacache, magcache, fbcache, taylorseer")
    assert engine.step_caches is report.step_caches
    compiled_forward = bundle.transformer.transformer_blocks[0].forward
    again = Engine(bundle, Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path, plan=plan).report
    assert again["weights"].details == {} and again["compile"].summary == "already compiled"  # nothing twice
    assert bundle.transformer.transformer_blocks[0].forward == compiled_forward
    assert sum(1 for m in bundle.transformer.modules() if type(m).__name__ == "FP8Linear") == fp8
    assert again.step_caches is report.step_caches  # one set of hooks
    final = engine.generate(GenerationRequest(prompt="x", image=test_image, seconds=1, steps=1, cache="none"),
                            lambda e: None)
    import json

    assert json.loads(final.sidecar_path.read_text())["transformer"] == report.to_record()
    # compile and a step cache compose: the cache's hooks run outside the compiled blocks, so its per-step state
    # never becomes a guard and skipping steps compiles nothing new (it used to recompile until dynamo gave up)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    cached = engine.generate(GenerationRequest(prompt="x", image=test_image, seconds=1, steps=6, cache="teacache",
                                               teacache_threshold=1.0), lambda e: None)
    assert json.loads(cached.sidecar_path.read_text())["step_cache"]["sections"][0]["skipped"] == 4
    assert counters["stats"]["unique_graphs"] == graphs
    set_attention_backend(bundle.transformer, "native")


def test_fp8_linear_close_to_the_original():
    from diffusers_helper.accel.fp8 import FP8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    f = FP8Linear(lin)
    assert f.weight.dtype == torch.float8_e4m3fn and f.weight.element_size() == 1
    err = ((f(x) - lin(x)).norm() / lin(x).norm()).item()
    assert 0 < err < 0.05  # e4m3 weights: a few percent per layer, never exact


def test_fp8_conversion_scope_and_fidelity(tiny_root):
    from diffusers_helper.accel.fp8 import FP8Linear, convert_to_fp8
    from diffusers_helper.models.loading import load_models
    from diffusers_helper.models.tiny import tiny_spec

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


def _provider(out, cache, kind="fp8", **fp8):
    from diffusers_helper.app.service import EngineProvider
    from diffusers_helper.config.formats import WeightFormat
    from diffusers_helper.pipeline.prepare import TransformerPlan

    return EngineProvider(outputs_dir=out, plan=TransformerPlan(weights=WeightFormat(kind, **fp8)), opt_cache=str(cache))


def _assert_reload_close(first, second, unconverted_provider, image, sampled_latents) -> None:
    """The reloaded transformer samples what the first one did, within a tolerance scaled to what a wrong reload
    would change: the conversion's own effect (the first run against the unconverted model). Exact equality is not
    asked for, since the reloaded weights sit at other addresses and some CPUs' BLAS rounds differently there;
    torchao INT8 then flips a few activation roundings (measured on an AMD EPYC: 0.33 of the conversion's effect)."""
    from diffusers_helper.parity import relative_l2
    from diffusers_helper.pipeline.request import GenerationRequest

    req = dict(prompt="x", seconds=1, steps=2, cache="none")
    runs = {}
    for name, engine in (("first", first), ("second", second), ("plain", unconverted_provider.get("tiny"))):
        engine.generate(GenerationRequest(image=image, **req), lambda e: None)
        runs[name] = sampled_latents()
    effect = relative_l2(runs["first"], runs["plain"])
    assert effect > 1e-6  # the conversion did change the model
    assert relative_l2(runs["second"], runs["first"]) < 0.5 * effect


def test_optimized_transformer_cache_saves_then_loads(tiny_root, tmp_path, test_image, caplog, monkeypatch,
                                                      same_weights, sampled_latents):
    from diffusers_helper.accel.fp8 import FP8Linear

    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tiny_root.parent))
    cache = tmp_path / "optimized_models"
    with caplog.at_level("INFO"):
        first = _provider(tmp_path / "a", cache).get("tiny")
    files = list(cache.glob("tiny-fp8-*.safetensors"))
    assert len(files) == 1 and "Saved optimized transformer weights to" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        second = _provider(tmp_path / "b", cache).get("tiny")
    assert "Loaded optimized transformer weights from" in caplog.text
    assert any(isinstance(m, FP8Linear) for m in second.bundle.transformer.modules())
    assert same_weights(first.bundle.transformer, second.bundle.transformer)  # the cached FP8 weights, bit for bit
    _assert_reload_close(first, second, _provider(tmp_path / "r", cache, "bf16"), test_image, sampled_latents)
    # other options: another file; a broken file: rebuilt, not fatal
    _provider(tmp_path / "c", cache, fp8_exclude_keys=("norm", "ff")).get("tiny")
    assert len(list(cache.glob("tiny-fp8-*.safetensors"))) == 2
    files[0].write_bytes(b"not a safetensors file")
    with caplog.at_level("WARNING"):
        _provider(tmp_path / "d", cache).get("tiny")
    assert "unreadable" in caplog.text and files[0].stat().st_size > 100


@pytest.mark.parametrize("bits", [8, 4])
def test_optimized_cache_keeps_torchao_weights(bits, tiny_root, tmp_path, test_image, caplog, monkeypatch,
                                               same_weights, sampled_latents):
    """torchao's tensor subclasses go through torch.save and come back with weights_only=True."""
    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tiny_root.parent))
    cache = tmp_path / "optimized_models"
    first = _provider(tmp_path / "a", cache, f"int{bits}").get("tiny")
    files = list(cache.glob(f"tiny-int{bits}-*.pt"))
    assert len(files) == 1
    caplog.clear()
    with caplog.at_level("INFO"):
        second = _provider(tmp_path / "b", cache, f"int{bits}").get("tiny")
    assert "Loaded optimized transformer weights from" in caplog.text
    weight = second.bundle.transformer.transformer_blocks[0].ff.net[2].weight
    assert type(weight).__module__.startswith("torchao") and second.report["weights"].details == {}  # not quantized again
    assert same_weights(first.bundle.transformer, second.bundle.transformer)  # the cached INT weights, bit for bit
    _assert_reload_close(first, second, _provider(tmp_path / "r", cache, "bf16"), test_image, sampled_latents)
    other = 4 if bits == 8 else 8  # the other width is another file, never this one
    _provider(tmp_path / "c", cache, f"int{other}").get("tiny")
    assert len(list(cache.glob(f"tiny-int{other}-*.pt"))) == 1


def test_backend_that_fails_its_first_call_falls_back(tiny_bundles, caplog, monkeypatch):
    """An install that imports but cannot run here (SageAttention built for another GPU) is caught before a job."""
    from diffusers.models import attention_dispatch

    transformer = tiny_bundles["tiny"].transformer

    def broken(*args, **kwargs):
        raise AssertionError("SM89 kernel is not available. Make sure you GPUs with compute capability 8.9.")

    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", broken)
    with caplog.at_level("WARNING"):
        used = set_attention_backend(transformer, "math")  # installed everywhere; its first call fails here
    monkeypatch.undo()
    try:
        assert used == "native"
        assert "Attention backend math unavailable (SM89 kernel is not available." in caplog.text
        assert {getattr(m.processor, "_attention_backend", None) for m in transformer.modules()
                if getattr(m, "processor", None) is not None} <= {None, "native"}
    finally:
        set_attention_backend(transformer, "native")


def test_sage_without_a_usable_install_falls_back(tiny_bundles, caplog):
    transformer = tiny_bundles["tiny"].transformer
    with caplog.at_level("WARNING"):
        used = set_attention_backend(transformer, "sage-fp8")  # no SageAttention 2 (nor a GPU) here
    try:
        assert used == "native" and "Attention backend sage-fp8 unavailable" in caplog.text
    finally:
        set_attention_backend(transformer, "native")
