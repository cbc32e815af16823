"""Dummy section inputs for a transformer forward, and the compile warm-up that uses them.

Regional compile specialises on shapes, and FramePack's text length changes with the prompt (batch 1
crops the padding), so the warm-up runs two forwards with different text lengths: the second makes
dynamo mark that dimension dynamic, and later prompts of any length reuse the kernels.
"""

from __future__ import annotations

import logging
import time

import torch

from .sections import SectionSchedule

log = logging.getLogger("framepack.warmup")


def section_inputs(transformer, size: int, dtype, device, window: int = 9, text_tokens: int = 60):
    cfg = transformer.config
    g = torch.Generator("cpu").manual_seed(0)
    lat = size // 8
    start = torch.randn(1, 16, 1, lat, lat, generator=g)
    schedule = SectionSchedule("inverted", start, 3, window)
    section = schedule.inputs(0).to_kwargs(device, dtype)
    mask = torch.zeros(1, 512, dtype=torch.bool)
    mask[:, :text_tokens] = True
    image_tokens = 729 if cfg.image_proj_dim == 1152 else 9
    cond = {"encoder_hidden_states": (torch.randn(1, 512, cfg.text_embed_dim, generator=g) * mask[..., None]).to(
                device, dtype),
            "encoder_attention_mask": mask.to(device),
            "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
            "image_embeds": torch.randn(1, image_tokens, cfg.image_proj_dim, generator=g).to(device, dtype),
            **section}
    noise = torch.randn(1, 16, window, lat, lat, generator=g)
    return cond, noise


def forward_fn(transformer, cond, noise, dtype, device):
    x = noise.to(device, dtype)
    t = torch.tensor([900.0], device=device, dtype=dtype)
    gs = torch.tensor([10000.0], device=device, dtype=dtype)

    def run():
        with torch.inference_mode():
            return transformer(hidden_states=x, timestep=t, guidance=gs, return_dict=False, **cond)[0]

    return run


def warm_up(transformer, size: int, window: int, dtype, device, text_tokens=(60, 61)) -> float:
    """Run one forward per text length at this bucket; returns the seconds it took."""
    t0 = time.perf_counter()
    for tokens in text_tokens:
        cond, noise = section_inputs(transformer, size, dtype, device, window=window, text_tokens=tokens)
        forward_fn(transformer, cond, noise, dtype, device)()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    log.info("Compile warm-up at %dx%d, window %d: %.1f s", size, size, window, seconds)
    return seconds
