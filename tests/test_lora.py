"""LoRAs: both file formats, several at once, switching between jobs, and clear errors for files that do not fit."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusers_helper.config.loras import LoraError, names_only, parse_lora_list
from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.events import Failed, Finished
from diffusers_helper.pipeline.request import GenerationRequest

TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.ff.net.2",
           "single_transformer_blocks.0.proj_out"]


def _deltas(transformer, seed: int, rank: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    out = {}
    for name in TARGETS:
        m = modules[name]
        out[name] = (torch.randn(rank, m.in_features, generator=g) * 0.3,
                     torch.randn(m.out_features, rank, generator=g) * 0.3)
    return out


def _diffusers_file(path: Path, deltas: dict, alpha: float | None = None) -> Path:
    state = {}
    for name, (down, up) in deltas.items():
        state[f"transformer.{name}.lora_A.weight"] = down.contiguous()
        state[f"transformer.{name}.lora_B.weight"] = up.contiguous()
        if alpha is not None:
            state[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def _kohya_file(path: Path, deltas: dict, alpha: float) -> Path:
    """The same deltas as kohya / musubi-tuner write them: alpha / rank scales lora_up @ lora_down."""
    state = {}
    for name, (down, up) in deltas.items():
        key = "lora_unet_" + name.replace(".", "_")
        rank = down.shape[0]
        state[f"{key}.lora_down.weight"] = down.contiguous()
        state[f"{key}.lora_up.weight"] = (up * rank / alpha).contiguous()  # so the product is the same delta
        state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def lora_env(tiny_bundles, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    transformer = tiny_bundles["tiny"].transformer
    d1, d2 = _deltas(transformer, 1), _deltas(transformer, 2)
    _diffusers_file(folder / "style.safetensors", d1)
    _kohya_file(folder / "style_kohya.safetensors", d1, alpha=2.0)
    _diffusers_file(folder / "other.safetensors", d2)
    save_file({"transformer.not_a_layer.lora_A.weight": torch.zeros(4, 8),
               "transformer.not_a_layer.lora_B.weight": torch.zeros(8, 4)}, str(folder / "alien.safetensors"))
    wrong = {TARGETS[0]: (torch.zeros(4, 7), torch.zeros(5, 4))}
    _diffusers_file(folder / "wrong_shape.safetensors", wrong)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    engine = Engine(tiny_bundles["tiny"], outputs_dir=tmp_path_factory.mktemp("lora-out"), lora_dir=folder)
    yield engine, folder
    engine.loras.apply([])


def _latents(engine, test_image, loras: str = "") -> tuple[list[torch.Tensor], Path]:
    captured = []
    decode = engine.decoder.decode
    engine.decoder.decode = lambda z, *a, **k: (captured.append(z.clone()), decode(z, *a, **k))[1]
    try:
        final = engine.generate(GenerationRequest(prompt="a cat", image=test_image, seed=3, seconds=1.0, steps=3,
                                                  cache="none", loras=loras), lambda e: None)
    finally:
        engine.decoder.decode = decode
    assert isinstance(final, Finished), final
    return captured, final.sidecar_path


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_weights_formats_and_switching(lora_env, test_image):
    engine, _ = lora_env
    bare, _ = _latents(engine, test_image)
    zero, _ = _latents(engine, test_image, "style.safetensors:0")
    assert _same(bare, zero)  # weight 0: exactly the bare model
    styled, sidecar = _latents(engine, test_image, "style:1")
    assert not _same(bare, styled)
    assert json.loads(Path(sidecar).read_text())["loras"] == [{"file": "style.safetensors", "weight": 1.0}]
    kohya, _ = _latents(engine, test_image, "style_kohya.safetensors")
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(styled, kohya))  # same deltas
    again_bare, _ = _latents(engine, test_image)  # unload
    assert _same(bare, again_bare)
    again, _ = _latents(engine, test_image, "style:1")  # load again
    assert _same(styled, again)
    both, _ = _latents(engine, test_image, "style:1, other:0.5")
    half, _ = _latents(engine, test_image, "style:0.5")
    assert not _same(both, styled) and not _same(half, styled) and not _same(half, bare)
    assert [(Path(p).name, w) for p, w in engine.loras.active] == [("style.safetensors", 0.5)]  # the last job's set


@pytest.mark.parametrize("weights, compiled, streamed", [("fp8", True, False), ("bf16", False, True)])
def test_loras_with_fp8_compile_and_streamed_blocks(tiny_root, tmp_path, test_image, lora_env, weights, compiled,
                                                    streamed):
    """The unfused LoRA layers wrap FP8 linears, sit inside compiled blocks and on streamed blocks: weight 0 is the
    bare model exactly, a LoRA changes the frames, and a streamed model gives the resident model's frames."""
    from diffusers_helper.accel.attention import AttentionConfig
    from diffusers_helper.accel.compile import CompileConfig
    from diffusers_helper.config.formats import WeightFormat
    from diffusers_helper.memory.placement import Placement, streamer_of
    from diffusers_helper.models.loading import load_models
    from diffusers_helper.models.tiny import tiny_spec
    from diffusers_helper.pipeline.prepare import TransformerPlan

    _, folder = lora_env
    plan = TransformerPlan(weights=WeightFormat(weights),
                           compile=CompileConfig(enabled=compiled, cache_dir=str(tmp_path)),
                           attention=AttentionConfig(backend="math"))
    placement = (Placement(torch.device("cpu"), "swap", probe=lambda: (1024**2, 0)) if streamed
                 else Placement(torch.device("cpu"), "full"))
    engine = Engine(load_models(tiny_spec("tiny", tiny_root)), placement, outputs_dir=tmp_path, plan=plan,
                    lora_dir=folder)
    bare, _ = _latents(engine, test_image)
    zero, _ = _latents(engine, test_image, "style:0")
    styled, _ = _latents(engine, test_image, "style")
    assert _same(bare, zero) and not _same(bare, styled)
    if streamed:
        assert streamer_of(engine.bundle.transformer) is not None
        resident = Engine(load_models(tiny_spec("tiny", tiny_root)), Placement(torch.device("cpu"), "full"),
                          outputs_dir=tmp_path, plan=plan, lora_dir=folder)
        reference, _ = _latents(resident, test_image, "style")
        assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(reference, styled))


@pytest.mark.parametrize("loras, message", [
    ("alien.safetensors", "alien.safetensors does not fit this model: 2 of 1 modules"),
    ("wrong_shape", "wrong_shape.safetensors does not fit this model: transformer_blocks.0.attn.to_q"),
    ("broken", "broken.safetensors is not a readable .safetensors file"),
    ("missing", "LoRA missing.safetensors is not in the LoRA folder"),
    ("style:9", "LoRA weight must be between -4 and 4"),
])
def test_a_lora_that_does_not_fit_fails_in_one_line(lora_env, test_image, loras, message):
    engine, _ = lora_env
    before = list(engine.loras.active)
    final = engine.generate(GenerationRequest(prompt="a cat", image=test_image, seed=3, seconds=1.0, steps=2,
                                              cache="none", loras=loras), lambda e: None)
    assert isinstance(final, Failed) and final.video_path is None
    assert message.split(": 2 of")[0] in final.error and "\n" not in final.error, final.error
    assert engine.loras.active == before  # nothing half applied


def test_clients_name_loras_never_paths():
    names_only("style.safetensors:0.8, detail")
    for bad in ["../style.safetensors", "/etc/passwd", "sub/style.safetensors", ".hidden"]:
        with pytest.raises(LoraError, match="not a path"):
            names_only(bad)
    assert parse_lora_list("a.safetensors:0.8,\nb , c:-1") == [("a.safetensors", 0.8), ("b", 1.0), ("c", -1.0)]


def test_cli_lora_flag(tmp_path, image_file, tiny_root, lora_env, monkeypatch):
    from diffusers_helper.generate import main

    _, folder = lora_env
    out = tmp_path / "o"
    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tiny_root.parent))
    code = main(["--image", str(image_file), "--prompt", "a cat", "--model", "tiny", "--seconds", "1", "--steps", "2",
                 "--lora", f"{folder / 'style.safetensors'}:0.7", "--output", str(out), "--quiet"])
    assert code == 0
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["loras"] == [{"file": "style.safetensors", "weight": 0.7}]
    assert main(["--image", str(image_file), "--prompt", "x", "--model", "tiny",
                 "--lora", str(tmp_path / "nope.safetensors"), "--output", str(out)]) == 2


def test_switching_loras_under_compile_builds_no_graph_per_block(tiny_root, tmp_path, test_image):
    """Every wrapped layer is one class with A and B as buffers: adding a LoRA compiles one graph per block kind
    (shared by every block), and a weight change, an unload or a reload compiles nothing new. A per-layer hook
    used to be a guard per layer, so each block recompiled until dynamo's limit sent it back to eager."""
    from torch._dynamo.utils import counters

    from diffusers_helper.accel.attention import AttentionConfig
    from diffusers_helper.accel.compile import CompileConfig
    from diffusers_helper.config.formats import WeightFormat
    from diffusers_helper.memory.placement import Placement
    from diffusers_helper.models.loading import load_models
    from diffusers_helper.models.tiny import build_tiny_transformer, tiny_spec
    from diffusers_helper.pipeline.prepare import TransformerPlan

    bundle = load_models(tiny_spec("tiny", tiny_root))
    bundle.transformer = build_tiny_transformer(7, num_layers=3, num_single_layers=5).eval().requires_grad_(False)
    state, g = {}, torch.Generator().manual_seed(0)
    for name, m in bundle.transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_v")) and "refiner" not in name:
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.1
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.1
    save_file(state, str(tmp_path / "all.safetensors"))
    plan = TransformerPlan(weights=WeightFormat("bf16"), compile=CompileConfig(enabled=True, cache_dir=str(tmp_path)),
                           attention=AttentionConfig(backend="math"))
    engine = Engine(bundle, Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path, plan=plan,
                    lora_dir=tmp_path)

    def graphs(loras: str) -> int:
        before = counters["stats"]["unique_graphs"]
        _latents(engine, test_image, loras)
        return counters["stats"]["unique_graphs"] - before

    graphs("")
    graphs("")  # strides settle after the first job
    assert graphs("all:1") <= 2  # the dual and the single block kind, not one per block (8 blocks)
    assert [graphs(x) for x in ("all:1", "all:0.5", "", "all:1")] == [0, 0, 0, 0]
