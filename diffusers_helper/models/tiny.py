"""The offline `tiny` model preset.

Random-weight miniatures of every FramePack part, built in code from fixed seeds and saved in the same
folder layout as the real Hugging Face repos. They let the whole app (loading, prompt encoding, sampling,
decoding, video writing) run end to end on a CPU in seconds, with no network, and give deterministic
outputs that tests can pin.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from . import specs as model_specs
from .specs import ModelSpec, PartSpec
from .tiny_tokenizers import build_clip_tokenizer, build_llama_tokenizer

logger = logging.getLogger("framepack.tiny")

# Bump when anything below changes what gets written, so old caches are rebuilt instead of reused.
TINY_FORMAT_VERSION = 1
MARKER_NAME = ".complete"

TINY_DIMS: dict = {
    "llama": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,  # hidden_states has 4 entries, so hidden_states[-3] exists
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "bpe_merges": 160,
    },
    "clip": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bpe_merges": 128,
    },
    "siglip": {
        "hidden_size": 24,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 48,
        "patch_size": 16,  # (48/16)^2 = 9 image tokens
    },
    "vae": {
        "latent_channels": 16,
        "block_out_channels": (4, 8, 8, 8),  # ~0.2-0.3 s to decode 37 frames at 64x64 on 2 cores
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "spatial_compression_ratio": 8,
        "temporal_compression_ratio": 4,
        "mid_block_add_attention": True,
        "scaling_factor": 0.476986,
    },
    # Exactly the parity fixture's transformer config (fixtures/framepack-parity/transformer/config.json).
    "transformer": {
        "attention_head_dim": 16,
        "guidance_embeds": True,
        "has_clean_x_embedder": True,
        "has_image_proj": True,
        "image_condition_type": None,
        "image_proj_dim": 24,
        "in_channels": 16,
        "mlp_ratio": 4.0,
        "num_attention_heads": 2,
        "num_layers": 1,
        "num_refiner_layers": 1,
        "num_single_layers": 1,
        "out_channels": 16,
        "patch_size": 2,
        "patch_size_t": 1,
        "pooled_projection_dim": 16,
        "qk_norm": "rms_norm",
        "rope_axes_dim": (4, 6, 6),
        "rope_theta": 256.0,
        "text_embed_dim": 32,
    },
}

# One seed per part, so changing one part leaves the others' weights unchanged.
SEEDS = {
    "text_encoder": 1001,
    "text_encoder_2": 1002,
    "image_encoder": 1003,
    "vae": 1004,
    "transformer_inverted": 1005,
    "transformer_f1": 1006,
}

def default_root() -> Path:
    """Where the preset lives unless told otherwise: next to the other caches, never in the HF cache."""
    env = os.environ.get("FRAMEPACK_CACHE_DIR")
    if env:
        return Path(env) / "tiny-models"
    return Path(__file__).resolve().parents[1] / "cache" / "tiny-models"


def _marker_ok(root: Path) -> bool:
    try:
        data = json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return data.get("format") == TINY_FORMAT_VERSION


def ensure_tiny_models(root: str | Path | None = None) -> Path:
    """Build the preset once; later calls only check the marker.

    The build goes to a temporary sibling folder whose marker is written last and is then renamed into
    place under a file lock, so a crash mid-build or two processes racing never leave a half-written
    preset that looks complete.
    """
    root = Path(root) if root is not None else default_root()
    root = root.expanduser().resolve()
    if _marker_ok(root):
        return root
    from filelock import FileLock

    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if _marker_ok(root):  # another process finished it while we waited
            return root
        t0 = time.perf_counter()
        # Not mkdtemp: its 0700 mode would make a shared cache unreadable to other users.
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            build_tiny_models(tmp)
            if root.exists():  # incomplete or outdated build: replace it
                stale = root.parent / f".{root.name}.stale-{os.getpid()}"
                os.rename(root, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built tiny models in %s (%.1f s)", root, time.perf_counter() - t0)
    return root


def build_tiny_models(dest: str | Path) -> None:
    """Write every part into `dest` (no locking, no marker checks); the marker is the last file written.

    The global torch RNG is restored afterwards, so building (say, lazily inside a generation) never
    changes what the caller's seeded code draws next.
    """
    with torch.random.fork_rng(devices=[]):
        _build_all(Path(dest))


def _build_all(dest: Path) -> None:
    hunyuan = dest / model_specs.HUNYUAN_REPO
    redux = dest / model_specs.REDUX_REPO

    llama_tok = build_llama_tokenizer(TINY_DIMS["llama"]["bpe_merges"], TINY_DIMS["llama"]["max_position_embeddings"])
    llama_tok.save_pretrained(hunyuan / "tokenizer")
    clip_tok = build_clip_tokenizer(TINY_DIMS["clip"]["bpe_merges"], TINY_DIMS["clip"]["max_position_embeddings"])
    clip_tok.save_pretrained(hunyuan / "tokenizer_2")

    _save(_build_llama(llama_tok), hunyuan / "text_encoder")
    _save(_build_clip_text(clip_tok), hunyuan / "text_encoder_2")
    _save(_build_vae(), hunyuan / "vae")

    _build_siglip_processor().save_pretrained(redux / "feature_extractor")
    _save(_build_siglip(), redux / "image_encoder")

    _save(build_tiny_transformer(SEEDS["transformer_inverted"]), dest / model_specs.FRAMEPACK_REPO)
    _save(build_tiny_transformer(SEEDS["transformer_f1"]), dest / model_specs.F1_REPO)

    (dest / MARKER_NAME).write_text(json.dumps({"format": TINY_FORMAT_VERSION}) + "\n")


def tiny_spec(name: str, root: str | Path) -> ModelSpec:
    """The real spec with repos swapped for local folders, so loading code has no tiny special case."""
    real_name = {"tiny": "framepack", "tiny-f1": "f1"}.get(name)
    if real_name is None:
        raise ValueError(f"unknown tiny model {name!r}; valid: 'tiny', 'tiny-f1'")
    root = Path(root)
    real = model_specs.real_spec(real_name)

    def local(part: PartSpec) -> PartSpec:
        return dataclasses.replace(
            part,
            repo=str(root / part.repo),
            dtype=torch.float32 if part.dtype is not None else None,
        )

    return dataclasses.replace(
        real,
        name=name,
        prompt_crop_start=None,
        default_resolution=64,
        **{key: local(part) for key, part in real.parts().items()},
    )


# ----------------------------------------------------------------------------------------- builders


def _save(model: torch.nn.Module, folder: Path) -> None:
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(str(folder), safe_serialization=True)


def _build_llama(tokenizer):
    from transformers import LlamaConfig, LlamaModel

    d = TINY_DIMS["llama"]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d["num_key_value_heads"],
        head_dim=d["head_dim"],
        max_position_embeddings=d["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEEDS["text_encoder"])
    return LlamaModel(config)


def _build_clip_text(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    d = TINY_DIMS["clip"]
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        projection_dim=d["hidden_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        max_position_embeddings=d["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # not 2, so the pooler looks for this id, not the argmax
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEEDS["text_encoder_2"])
    return CLIPTextModel(config)


def _build_siglip_processor():
    """PIL-backed so it is the same class with or without torchvision (see loading.py)."""
    from transformers import SiglipImageProcessorPil

    size = TINY_DIMS["siglip"]["image_size"]
    return SiglipImageProcessorPil(size={"height": size, "width": size})


def _build_siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    d = TINY_DIMS["siglip"]
    config = SiglipVisionConfig(
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        image_size=d["image_size"],
        patch_size=d["patch_size"],
    )
    torch.manual_seed(SEEDS["image_encoder"])
    return SiglipVisionModel(config)


def _build_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    d = TINY_DIMS["vae"]
    torch.manual_seed(SEEDS["vae"])
    return AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=d["latent_channels"],
        block_out_channels=tuple(d["block_out_channels"]),
        layers_per_block=d["layers_per_block"],
        norm_num_groups=d["norm_num_groups"],
        scaling_factor=d["scaling_factor"],
        spatial_compression_ratio=d["spatial_compression_ratio"],
        temporal_compression_ratio=d["temporal_compression_ratio"],
        mid_block_add_attention=d["mid_block_add_attention"],
    )


def build_tiny_transformer(seed: int, **overrides):
    """The tiny transformer; `overrides` change its config (tests use deeper stacks)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    config = dict(TINY_DIMS["transformer"], **overrides)
    config["rope_axes_dim"] = tuple(config["rope_axes_dim"])
    torch.manual_seed(seed)
    model = HunyuanVideoFramepackTransformer3DModel(**config)
    # Any weight left at exactly zero (zero-init projections) would make outputs ignore their inputs.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() >= 2 and not param.any():
                param.normal_(0.0, 0.02)
    return model
