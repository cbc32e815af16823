"""Turn a prompt and an image into the tensors the FramePack transformer is conditioned on, and fit the image
to a resolution bucket (cover-resize and center-crop) as the original does.

Exactly the original's recipe: templated Llama prompt,
hidden_states[-3] cropped to the prompt tokens and padded to 512 with a mask; CLIP-L pooler; the image
fitted to a bucket, VAE-encoded as one frame and embedded by SigLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..models.specs import PROMPT_TEMPLATE

LLAMA_MAX_TOKENS = 256
LLAMA_PAD_TO = 512
CLIP_TOKENS = 77


@dataclass
class PromptEmbeds:
    llama: torch.Tensor  # (1, 512, D) zero-padded
    llama_mask: torch.Tensor  # (1, 512) bool
    pooled: torch.Tensor  # (1, D2)

    def zeros_like(self) -> "PromptEmbeds":
        """All-zero negative of the same shapes: what the original uses when real CFG is 1."""
        return PromptEmbeds(torch.zeros_like(self.llama), self.llama_mask.clone(), torch.zeros_like(self.pooled))

    @staticmethod
    def mix(items: list[tuple["PromptEmbeds", float]]) -> "PromptEmbeds":
        """A weighted blend of prompts (weights summing to 1): embeddings and pooled vectors mixed linearly, the
        text tokens of every prompt kept (masks joined; a shorter prompt's padding is zeros)."""
        if len(items) == 1:
            return items[0][0]
        llama = sum(e.llama.float() * w for e, w in items).to(items[0][0].llama.dtype)
        pooled = sum(e.pooled.float() * w for e, w in items).to(items[0][0].pooled.dtype)
        mask = items[0][0].llama_mask.clone()
        for e, _ in items[1:]:
            mask |= e.llama_mask
        return PromptEmbeds(llama, mask, pooled)


def crop_or_pad_with_mask(x: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, d = x.shape
    if n >= length:
        return x[:, :length], torch.ones((b, length), dtype=torch.bool, device=x.device)
    padded = torch.cat([x, x.new_zeros((b, length - n, d))], dim=1)
    mask = torch.zeros((b, length), dtype=torch.bool, device=x.device)
    mask[:, :n] = True
    return padded, mask


def template_crop_start(tokenizer) -> int:
    """Tokens before the user prompt in the template; the real Llama-3 value is fixed in model_specs."""
    ids = tokenizer(PROMPT_TEMPLATE, return_attention_mask=False)["input_ids"]
    return len(ids) - 2  # drop the "{}" placeholder and the closing <|eot_id|>


def encode_prompt(prompt: str, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                  crop_start: int | None) -> PromptEmbeds:
    if crop_start is None:
        crop_start = template_crop_start(tokenizer)
    # Right padding: the crop below assumes the prompt tokens come first.
    llama_in = tokenizer([PROMPT_TEMPLATE.format(prompt)], padding="max_length",
                         max_length=LLAMA_MAX_TOKENS + crop_start, truncation=True, return_tensors="pt",
                         return_attention_mask=True, padding_side="right")
    ids = llama_in["input_ids"].to(text_encoder.device)
    mask = llama_in["attention_mask"].to(text_encoder.device)
    length = int(mask.sum())
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-3]
    llama = hidden[:, crop_start:length]

    clip_ids = tokenizer_2([prompt], padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                           return_tensors="pt")["input_ids"]
    pooled = text_encoder_2(clip_ids.to(text_encoder_2.device), output_hidden_states=False).pooler_output

    llama, llama_mask = crop_or_pad_with_mask(llama, LLAMA_PAD_TO)
    return PromptEmbeds(llama, llama_mask, pooled)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 to (1, 3, 1, H, W) in [-1, 1]."""
    return (torch.from_numpy(image).float() / 127.5 - 1).permute(2, 0, 1)[None, :, None]


def vae_encode(pixels: torch.Tensor, vae) -> torch.Tensor:
    """Encode with the posterior mean: deterministic, so one seed always gives one video."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mode() * vae.config.scaling_factor


def siglip_embed(image: np.ndarray, feature_extractor, image_encoder) -> torch.Tensor:
    inputs = feature_extractor.preprocess(images=image, return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device=image_encoder.device, dtype=image_encoder.dtype)
    return image_encoder(pixel_values=pixel_values).last_hidden_state

# (height, width) buckets of the original app at resolution 640.
BUCKETS_640 = (
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
)


def buckets_for(resolution: int) -> tuple[tuple[int, int], ...]:
    """The 640 table, or the same aspect ratios scaled to another resolution (multiples of 16)."""
    if resolution == 640:
        return BUCKETS_640
    if resolution < 32:
        raise ValueError(f"resolution must be at least 32, got {resolution}")
    scale = resolution / 640

    def snap(v: int) -> int:
        return max(16, int(round(v * scale / 16)) * 16)

    return tuple((snap(h), snap(w)) for h, w in BUCKETS_640)


def find_nearest_bucket(h: int, w: int, resolution: int = 640) -> tuple[int, int]:
    """Bucket whose aspect ratio is nearest to h:w; ties go to the later bucket, as in the original."""
    best, best_metric = None, float("inf")
    for bh, bw in buckets_for(resolution):
        metric = abs(h * bw - w * bh)
        if metric <= best_metric:
            best, best_metric = (bh, bw), metric
    return best


def resize_and_center_crop(image: np.ndarray, target_width: int, target_height: int) -> np.ndarray:
    """Lanczos-resize so the image covers the target, then crop the middle."""
    if image.shape[0] == target_height and image.shape[1] == target_width:
        return image
    pil = Image.fromarray(image)
    ow, oh = pil.size
    scale = max(target_width / ow, target_height / oh)
    rw, rh = int(round(ow * scale)), int(round(oh * scale))
    resized = pil.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - target_width) / 2, (rh - target_height) / 2
    return np.array(resized.crop((left, top, left + target_width, top + target_height)))


@dataclass
class JobImages:
    """The start image fitted to its bucket, its latent and SigLIP embedding, and the end image's and keyframes'
    latents (fitted to the same bucket), with the fitted images for the job's files."""

    image: np.ndarray
    start_latent: torch.Tensor
    embeds: torch.Tensor
    end_latent: torch.Tensor | None = None
    end_image: np.ndarray | None = None
    keyframes: list = None  # [(seconds, latent, fitted image)]
    source_latents: torch.Tensor | None = None  # a video being extended: its last frames, encoded
    source_frames: np.ndarray | None = None  # ... and all its frames, fitted to the bucket (uint8)


def encode_job_images(bundle, use, request, resolution: int) -> JobImages:
    """`use(*names)` puts those models on the compute device. With an end image, the SigLIP embedding mixes the
    start's and the end's (half each at strength 1), as the first-last-frame forks do."""
    h, w = request.image.shape[:2]
    height, width = find_nearest_bucket(h, w, resolution)

    def fit(img):
        return resize_and_center_crop(img, target_width=width, target_height=height)

    image = fit(request.image)
    source = None if request.source_frames is None else np.stack([fit(f) for f in request.source_frames])
    first = request.image if source is None else source[0]  # an extended video's first frame is the anchor
    use("vae")
    latents = [vae_encode(image_to_tensor(fit(img)), bundle.vae).float().cpu()
               for img in [first] + ([request.end_image] if request.end_image is not None else [])
               + [img for _, img in request.keyframes]]
    source_latents = None if source is None else encode_video_tail(source, bundle.vae)
    use("image_encoder")
    embeds = siglip_embed(image, bundle.feature_extractor, bundle.image_encoder)
    out = JobImages(image, latents[0], embeds, keyframes=[], source_latents=source_latents, source_frames=source)
    rest = latents[1:]
    if request.end_image is not None:
        out.end_image, out.end_latent, rest = fit(request.end_image), rest[0], rest[1:]
        end_embeds = siglip_embed(out.end_image, bundle.feature_extractor, bundle.image_encoder)
        mix = request.end_strength / 2
        out.embeds = (embeds.float() * (1 - mix) + end_embeds.float() * mix).to(embeds.dtype)
    out.keyframes = [(t, z, fit(img)) for (t, img), z in zip(request.keyframes, rest)]
    return out


def encode_video_tail(frames: np.ndarray, vae, latents: int = 19) -> torch.Tensor:
    """The last 4n+1 frames (n < `latents`, FramePack's history length) encoded as one clip: the causal VAE maps
    them to n+1 latent frames ending with the video's last frame."""
    n = min((len(frames) - 1) // 4, latents - 1)
    clip = torch.from_numpy(np.ascontiguousarray(frames[len(frames) - (4 * n + 1):])).float() / 127.5 - 1
    return vae_encode(clip.permute(3, 0, 1, 2)[None], vae).float().cpu()
