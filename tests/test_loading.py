"""The tiny preset and the shared loading path: layout, classes, determinism, offline errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_helper.models import specs as model_specs
from diffusers_helper.models.loading import PART_NAMES, WeightsMissingError, load_models, resolve_spec
from diffusers_helper.models.tiny import MARKER_NAME, TINY_DIMS, build_tiny_models, ensure_tiny_models, tiny_spec

from conftest import FIXTURE_DIR

FIXTURE_CONFIG = FIXTURE_DIR / "transformer" / "config.json"

MODEL_FOLDERS = [
    "hunyuanvideo-community/HunyuanVideo/text_encoder",
    "hunyuanvideo-community/HunyuanVideo/text_encoder_2",
    "hunyuanvideo-community/HunyuanVideo/vae",
    "lllyasviel/flux_redux_bfl/image_encoder",
    "lllyasviel/FramePackI2V_HY",
    "lllyasviel/FramePack_F1_I2V_HY_20250503",
]
CONFIG_FOLDERS = {
    "hunyuanvideo-community/HunyuanVideo/tokenizer": "tokenizer_config.json",
    "hunyuanvideo-community/HunyuanVideo/tokenizer_2": "tokenizer_config.json",
    "lllyasviel/flux_redux_bfl/feature_extractor": "preprocessor_config.json",
}


@pytest.fixture(scope="session")
def bundle(tiny_root):
    return load_models(tiny_spec("tiny", tiny_root), offline=True)


def _safetensors(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return files[0]


def test_layout_matches_real_repos(tiny_root):
    assert json.loads((tiny_root / MARKER_NAME).read_text())["format"] >= 1
    for rel in MODEL_FOLDERS:
        folder = tiny_root / rel
        assert (folder / "config.json").is_file(), rel
        tensors = load_file(str(_safetensors(folder)))
        assert all(t.dtype == torch.float32 for t in tensors.values()), rel
    for rel, config in CONFIG_FOLDERS.items():
        assert (tiny_root / rel / config).is_file(), rel
    # every spec part points inside the preset, at the same org/repo[/subfolder] as the real one
    for name in ("tiny", "tiny-f1"):
        spec = tiny_spec(name, tiny_root)
        real = model_specs.real_spec({"tiny": "framepack", "tiny-f1": "f1"}[name])
        for key, part in spec.parts().items():
            assert part.repo == str(tiny_root / real.parts()[key].repo)
            assert part.subfolder == real.parts()[key].subfolder
            assert part.dtype in (None, torch.float32)
        assert spec.prompt_crop_start is None and spec.default_resolution == 64
    assert tiny_spec("tiny", tiny_root).mode == "inverted"
    assert tiny_spec("tiny-f1", tiny_root).mode == "f1"


def test_transformer_config_matches_fixture(tiny_root):
    ours = json.loads((tiny_root / "lllyasviel/FramePackI2V_HY/config.json").read_text())
    if FIXTURE_CONFIG.is_file():
        expected = json.loads(FIXTURE_CONFIG.read_text())
    else:
        expected = dict(TINY_DIMS["transformer"], rope_axes_dim=list(TINY_DIMS["transformer"]["rope_axes_dim"]))
    for key, value in expected.items():
        if not key.startswith("_"):
            assert ours[key] == value, key


def test_load_all_parts(bundle):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from transformers import (
        CLIPTextModel,
        CLIPTokenizer,
        LlamaModel,
        PreTrainedTokenizerFast,
        SiglipImageProcessorPil,
        SiglipVisionModel,
    )

    expected = {
        "transformer": HunyuanVideoFramepackTransformer3DModel,
        "text_encoder": LlamaModel,
        "text_encoder_2": CLIPTextModel,
        "tokenizer": PreTrainedTokenizerFast,
        "tokenizer_2": CLIPTokenizer,
        "vae": AutoencoderKLHunyuanVideo,
        "feature_extractor": SiglipImageProcessorPil,
        "image_encoder": SiglipVisionModel,
    }
    for name in PART_NAMES:
        assert isinstance(getattr(bundle, name), expected[name]), name
    models = bundle.models()
    assert set(models) == {"transformer", "text_encoder", "text_encoder_2", "vae", "image_encoder"}
    for name, module in models.items():
        assert not module.training, name
        for p in module.parameters():
            assert p.dtype == torch.float32 and not p.requires_grad and p.device.type == "cpu", name
    assert bundle.vae.config.scaling_factor == pytest.approx(0.476986)
    assert bundle.transformer.proj_out.weight.abs().sum() > 0


def test_parts_subset(tiny_root):
    b = load_models(tiny_spec("tiny-f1", tiny_root), parts=["vae", "tokenizer_2"], offline=True)
    assert b.vae is not None and b.tokenizer_2 is not None and b.transformer is None
    with pytest.raises(ValueError, match="valid parts"):
        load_models(tiny_spec("tiny", tiny_root), parts=["nope"])


def test_build_is_deterministic(tiny_root, tmp_path):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_models(tmp_path)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    for rel in ("lllyasviel/FramePackI2V_HY", "hunyuanvideo-community/HunyuanVideo/text_encoder"):
        a = load_file(str(_safetensors(tiny_root / rel)))
        b = load_file(str(_safetensors(tmp_path / rel)))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (rel, key)
    for rel in ("hunyuanvideo-community/HunyuanVideo/tokenizer", "hunyuanvideo-community/HunyuanVideo/tokenizer_2"):
        assert (tiny_root / rel / "tokenizer.json").read_bytes() == (tmp_path / rel / "tokenizer.json").read_bytes()
    # the two transformers are different models (different seeds)
    inv = load_file(str(_safetensors(tiny_root / "lllyasviel/FramePackI2V_HY")))
    f1 = load_file(str(_safetensors(tiny_root / "lllyasviel/FramePack_F1_I2V_HY_20250503")))
    assert not torch.equal(inv["proj_out.weight"], f1["proj_out.weight"])


def test_interrupted_build_is_rebuilt(tmp_path, monkeypatch):
    import diffusers_helper.models.tiny as tiny

    calls = []
    real_build = tiny.build_tiny_models

    def counting_build(dest):
        calls.append(dest)
        real_build(dest)

    monkeypatch.setattr(tiny, "build_tiny_models", counting_build)
    root = tmp_path / "tiny-models"
    # a leftover from a build killed half-way: some files, no marker
    (root / "lllyasviel/FramePackI2V_HY").mkdir(parents=True)
    (root / "lllyasviel/FramePackI2V_HY/config.json").write_text("{")
    assert ensure_tiny_models(root) == root.resolve()
    assert len(calls) == 1
    assert (root / MARKER_NAME).is_file()
    assert json.loads((root / "lllyasviel/FramePackI2V_HY/config.json").read_text())["in_channels"] == 16
    ensure_tiny_models(root)  # complete now: not rebuilt
    assert len(calls) == 1
    (root / MARKER_NAME).unlink()
    ensure_tiny_models(root)
    assert len(calls) == 2
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".stale-" in p.name]


def test_default_root_honours_cache_dir(monkeypatch, tmp_path):
    from diffusers_helper.models.tiny import default_root

    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tmp_path))
    assert default_root() == tmp_path / "tiny-models"


def test_resolve_spec_unknown():
    with pytest.raises(ValueError) as info:
        resolve_spec("nope")
    for name in model_specs.MODEL_NAMES:
        assert name in str(info.value)


def test_resolve_spec_real_and_models_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("FRAMEPACK_MODELS_DIR", raising=False)
    assert resolve_spec("framepack") == model_specs.real_spec("framepack")
    (tmp_path / "lllyasviel/FramePackI2V_HY").mkdir(parents=True)
    spec = resolve_spec("framepack", models_dir=tmp_path)
    assert spec.transformer.repo == str((tmp_path / "lllyasviel/FramePackI2V_HY").resolve())
    assert spec.transformer.dtype == torch.bfloat16
    assert spec.vae.repo == model_specs.HUNYUAN_REPO  # not mirrored: stays a hub id
    monkeypatch.setenv("FRAMEPACK_MODELS_DIR", str(tmp_path))
    assert resolve_spec("framepack").transformer.repo == spec.transformer.repo
    assert resolve_spec("f1").transformer.repo == model_specs.F1_REPO


def test_offline_missing_weights(tmp_path):
    empty = tmp_path / "hf-cache"
    empty.mkdir()
    with pytest.raises(WeightsMissingError) as info:
        load_models(model_specs.real_spec("framepack"), offline=True, cache_dir=str(empty))
    msg = str(info.value)
    assert "lllyasviel/FramePackI2V_HY" in msg and "offline" in msg
    assert "\n" not in msg
    assert info.value.offline and "lllyasviel/FramePackI2V_HY" in info.value.repos


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")  # diffusers passes a deprecated hub argument
def test_offline_partial_cache_maps_error(tmp_path):
    """A cached config without its weights gets past the pre-check; from_pretrained's OSError is mapped."""
    cache = tmp_path / "hf-cache"
    commit = "0" * 40
    repo_dir = cache / "models--lllyasviel--FramePackI2V_HY"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs/main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(FIXTURE_CONFIG.read_text() if FIXTURE_CONFIG.is_file() else "{}")
    with pytest.raises(WeightsMissingError) as info:
        load_models(model_specs.real_spec("framepack"), offline=True, cache_dir=str(cache), parts=["transformer"])
    assert "lllyasviel/FramePackI2V_HY" in str(info.value) and "offline" in str(info.value)


def test_missing_local_folder_files(tmp_path):
    (tmp_path / "lllyasviel/FramePackI2V_HY").mkdir(parents=True)
    spec = resolve_spec("framepack", models_dir=tmp_path)
    with pytest.raises(WeightsMissingError, match="FramePackI2V_HY"):
        load_models(spec, offline=True, parts=["transformer"])


def test_llama_tokenizer_and_encoder(bundle):
    tok = bundle.tokenizer
    text = model_specs.PROMPT_TEMPLATE.format("a cat")
    enc = tok(text, max_length=256, padding="max_length", truncation=True, return_tensors="pt")
    ids = enc.input_ids[0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # BOS added once, like Llama-3
    for special in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tok.convert_tokens_to_ids(special) in ids  # kept whole, not split into bytes
    n = int(enc.attention_mask.sum())
    assert enc.attention_mask[0, :n].all() and ids[n:] == [tok.pad_token_id] * (256 - n)  # right padding
    assert tok.decode(ids[:n], skip_special_tokens=False).endswith("a cat<|eot_id|>")
    tok("Ünïcödé 日本語 🐱 tabs\tand\nnewlines")  # byte-level: never fails on any text
    # "{}" is one token, so the user prompt starts 2 tokens before the end of the bare template
    template_ids = tok(model_specs.PROMPT_TEMPLATE)["input_ids"]
    assert tok.convert_ids_to_tokens(template_ids[-2:]) == ["{}", "<|eot_id|>"]
    crop = len(template_ids) - 2
    assert ids[:crop] == template_ids[:crop] and tok.decode(ids[crop:n]) == "a cat<|eot_id|>"
    with torch.no_grad():
        out = bundle.text_encoder(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True
        )
    assert len(out.hidden_states) >= 3
    assert out.hidden_states[-3].shape == (1, 256, 32)
    assert torch.isfinite(out.hidden_states[-3]).all()


def test_clip_tokenizer_and_encoder(bundle):
    tok = bundle.tokenizer_2
    assert tok.model_max_length == 77
    prompt = ["a cat walks on the grass, 日本"]
    enc = tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == (1, 77)
    assert enc.input_ids[0, 0] == tok.convert_tokens_to_ids("<|startoftext|>")
    with torch.no_grad():
        pooled = bundle.text_encoder_2(enc.input_ids, attention_mask=enc.attention_mask).pooler_output
    assert pooled.shape == (1, 16)


def test_siglip_processor_and_encoder(bundle):
    image = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    pixels = bundle.feature_extractor.preprocess(image, return_tensors="pt")
    with torch.no_grad():
        hidden = bundle.image_encoder(**pixels).last_hidden_state
    assert hidden.shape == (1, 9, 24)


def test_vae_round_trip_shapes(bundle):
    with torch.no_grad():
        latent = bundle.vae.encode(torch.zeros(1, 3, 1, 64, 64)).latent_dist.mode()
        assert latent.shape == (1, 16, 1, 8, 8)
        video = bundle.vae.decode(torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))).sample
    assert video.shape == (1, 3, 9, 64, 64)


def test_transformer_output_depends_on_input(bundle):
    tr = bundle.transformer
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2, 4, 4, generator=g)
    kwargs = dict(
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool),
        pooled_projections=torch.randn(1, 16, generator=g),
        guidance=torch.tensor([10000.0]),
        image_embeds=torch.randn(1, 9, 24, generator=g),
        indices_latents=torch.arange(3, 5),  # 1-D: diffusers 0.42's rope meshgrid rejects (B, T)
        latents_clean=torch.randn(1, 16, 2, 4, 4, generator=g),
        indices_latents_clean=torch.tensor([0, 5]),
        latents_history_2x=torch.randn(1, 16, 2, 4, 4, generator=g),
        indices_latents_history_2x=torch.tensor([6, 7]),
        latents_history_4x=torch.randn(1, 16, 16, 4, 4, generator=g),
        indices_latents_history_4x=torch.arange(8, 24),
        return_dict=False,
    )
    with torch.no_grad():
        a = tr(latents, **kwargs)[0]
        b = tr(latents + 1.0, **kwargs)[0]
    assert a.shape == latents.shape
    assert not torch.allclose(a, b)
