"""Full-size FramePack models with random weights, built in memory for benchmarks.

The real weights are a 30 GB download; speed and memory do not depend on the values, so benchmarks
build the real architectures (the published repos' configs) straight on the GPU in their real dtypes. The
tokenizers come from the tiny preset (their vocabulary fits the full-size embeddings).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .loading import ModelBundle, load_models
from .specs import real_spec
from .tiny import ensure_tiny_models, tiny_spec

log = logging.getLogger("framepack.fullsize")

TRANSFORMER_CONFIG = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56), image_condition_type=None, has_image_proj=True, image_proj_dim=1152,
    has_clean_x_embedder=True,
)


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def build_transformer(device="cuda", dtype=torch.bfloat16):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    with torch.device(device), _default_dtype(dtype):
        model = HunyuanVideoFramepackTransformer3DModel(**TRANSFORMER_CONFIG)
    return model.eval().requires_grad_(False)


def build_vae(device="cuda", dtype=torch.float16):
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.device(device), _default_dtype(dtype):
        model = AutoencoderKLHunyuanVideo()  # the defaults are HunyuanVideo's VAE
    return model.eval().requires_grad_(False)


def build_text_encoders(device="cuda", dtype=torch.float16):
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    llama_cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                            intermediate_size=14336, vocab_size=128320, max_position_embeddings=8192,
                            rms_norm_eps=1e-5, rope_theta=500000.0)
    clip_cfg = CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              vocab_size=49408, max_position_embeddings=77, projection_dim=768)
    with torch.device(device), _default_dtype(dtype):
        llama = LlamaModel(llama_cfg)
        clip = CLIPTextModel(clip_cfg)
    return llama.eval().requires_grad_(False), clip.eval().requires_grad_(False)


def build_image_encoder(device="cuda", dtype=torch.float16):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
                             image_size=384, patch_size=14)
    with torch.device(device), _default_dtype(dtype):
        model = SiglipVisionModel(cfg)
    return model.eval().requires_grad_(False)


def build_bundle(model: str = "framepack", device="cuda", parts: tuple[str, ...] | None = None) -> ModelBundle:
    """A ModelBundle with the real spec (crop start derived from the stand-in tokenizer)."""
    from transformers import SiglipImageProcessorPil

    parts = parts or ("transformer", "text_encoder", "text_encoder_2", "vae", "image_encoder")
    tiny = load_models(tiny_spec("tiny", ensure_tiny_models()), parts=["tokenizer", "tokenizer_2"])
    spec = dataclasses.replace(real_spec(model), prompt_crop_start=None)
    bundle = ModelBundle(spec=spec, tokenizer=tiny.tokenizer, tokenizer_2=tiny.tokenizer_2,
                         feature_extractor=SiglipImageProcessorPil(size={"height": 384, "width": 384}))
    if "transformer" in parts:
        bundle.transformer = build_transformer(device)
    if "text_encoder" in parts or "text_encoder_2" in parts:
        bundle.text_encoder, bundle.text_encoder_2 = build_text_encoders(device)
    if "vae" in parts:
        bundle.vae = build_vae(device)
    if "image_encoder" in parts:
        bundle.image_encoder = build_image_encoder(device)
    return bundle


def seeded_transformer(device) -> tuple[torch.nn.Module, torch.dtype, int]:
    """The same weights at every call, so benchmark rows compare like with like: on CUDA the full-size transformer
    drawn from seed 0 (bf16, 640 bucket), elsewhere the tiny preset's from disk (float32, 64)."""
    device = torch.device(device)
    torch.manual_seed(0)
    if device.type == "cuda":
        return build_transformer(device), torch.bfloat16, 640
    transformer = load_models(tiny_spec("tiny", ensure_tiny_models()), parts=["transformer"]).transformer
    return transformer.to(device), torch.float32, 64
