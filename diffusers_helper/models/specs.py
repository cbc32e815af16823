"""Where each model part lives and how it is loaded.

One table for the real Hugging Face repos and one for the offline `tiny` preset, so the loading code
is the same for both: only the repo ids (or local folders) differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# HunyuanVideo's prompt template; crop_start is the number of template tokens before the user prompt
# for the real Llama-3 tokenizer (the same value diffusers ships).
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
REAL_LLAMA_CROP_START = 95


@dataclass(frozen=True)
class PartSpec:
    """One loadable part: repo (or local folder), subfolder, class name and dtype."""

    repo: str
    subfolder: str | None
    cls: str
    dtype: torch.dtype | None = None  # None for tokenizers and processors


@dataclass(frozen=True)
class ModelSpec:
    """Every part the engine needs for one model choice."""

    name: str
    mode: str  # "inverted" (FramePackI2V_HY anti-drifting) or "f1" (forward sampling)
    transformer: PartSpec
    text_encoder: PartSpec
    text_encoder_2: PartSpec
    tokenizer: PartSpec
    tokenizer_2: PartSpec
    vae: PartSpec
    feature_extractor: PartSpec
    image_encoder: PartSpec
    # None: derive from the tokenizer (needed for the tiny tokenizer, whose template length differs).
    prompt_crop_start: int | None = REAL_LLAMA_CROP_START
    default_resolution: int = 640

    def parts(self) -> dict[str, PartSpec]:
        return {
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer": self.tokenizer,
            "tokenizer_2": self.tokenizer_2,
            "vae": self.vae,
            "feature_extractor": self.feature_extractor,
            "image_encoder": self.image_encoder,
        }


HUNYUAN_REPO = "hunyuanvideo-community/HunyuanVideo"
REDUX_REPO = "lllyasviel/flux_redux_bfl"
FRAMEPACK_REPO = "lllyasviel/FramePackI2V_HY"
F1_REPO = "lllyasviel/FramePack_F1_I2V_HY_20250503"


def _real_spec(name: str, mode: str, transformer_repo: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        mode=mode,
        transformer=PartSpec(transformer_repo, None, "HunyuanVideoFramepackTransformer3DModel", torch.bfloat16),
        text_encoder=PartSpec(HUNYUAN_REPO, "text_encoder", "LlamaModel", torch.float16),
        text_encoder_2=PartSpec(HUNYUAN_REPO, "text_encoder_2", "CLIPTextModel", torch.float16),
        tokenizer=PartSpec(HUNYUAN_REPO, "tokenizer", "LlamaTokenizerFast"),
        tokenizer_2=PartSpec(HUNYUAN_REPO, "tokenizer_2", "CLIPTokenizer"),
        vae=PartSpec(HUNYUAN_REPO, "vae", "AutoencoderKLHunyuanVideo", torch.float16),
        feature_extractor=PartSpec(REDUX_REPO, "feature_extractor", "SiglipImageProcessor"),
        image_encoder=PartSpec(REDUX_REPO, "image_encoder", "SiglipVisionModel", torch.float16),
    )


MODEL_NAMES = ("framepack", "f1", "tiny", "tiny-f1")


def real_spec(name: str) -> ModelSpec:
    if name == "framepack":
        return _real_spec("framepack", "inverted", FRAMEPACK_REPO)
    if name == "f1":
        return _real_spec("f1", "f1", F1_REPO)
    raise KeyError(name)
