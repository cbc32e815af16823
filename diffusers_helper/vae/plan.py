"""Choosing how to decode a section: which decoder, how long the temporal tiles, how big the chunks.

Estimates are deliberately simple (bytes of the stored full-resolution activations plus one chunk of
temporaries, times a safety factor) and are logged, so a user can see why a path was taken.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("framepack.vae")

DEFAULT_CHUNK_BUDGET = 512 * 1024**2


@dataclass(frozen=True)
class DecodeOptions:
    """The settings that shape decoding (FRAMEPACK_VAE_* and Quality Mode)."""

    chunk_size: int = 0  # latent frames per chunk; 0 = sized from free memory
    reserve_gb: float = 2.0
    safety: float = 1.2
    backend: str = "exact"  # exact (layer-wise), stock (vae.decode), compiled, tensorrt
    chunk_multiplier: float = 1.0  # scales the auto-sized chunk budget
    upscale_factor: int = 8  # pixels per latent, for the memory estimate
    max_attention_tokens: int = 2048  # query tokens per attention call in the mid block
    tensorrt_cache_dir: str = "cache/trt_cache"
    trt_workspace_mb: int = 4096
    trt_max_aux_streams: int = 2
    trt_max_cached_shapes: int = 8


@dataclass(frozen=True)
class DecodePlan:
    method: str  # "layerwise" or "spatial-tiles"
    tile_latents: int | None  # None: the stock 4+1 latent tiles
    chunk_budget_bytes: int
    reason: str


def _bytes(vae) -> int:
    return torch.finfo(vae.dtype).bits // 8


def full_res_frame_bytes(vae, height: int, width: int) -> int:
    """One pixel frame of the widest full-resolution activation (block_out_channels[0] channels)."""
    return vae.config.block_out_channels[0] * height * width * _bytes(vae)


def tile_peak_bytes(vae, tile_latents: int, height: int, width: int, chunk_budget: int) -> int:
    """Two stored full-resolution activations of one tile, the half-resolution input of the last
    upsampler, and one chunk of temporaries."""
    frames = (tile_latents - 1) * vae.temporal_compression_ratio + 1
    full = full_res_frame_bytes(vae, height, width) * frames
    half_c = vae.config.block_out_channels[min(1, len(vae.config.block_out_channels) - 1)]
    half = half_c * (frames // 2 + 1) * (height // 2) * (width // 2) * _bytes(vae)
    return int(2 * full + half + chunk_budget)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        from ..memory.policy import cuda_free_bytes

        return cuda_free_bytes(device)  # within a per-process memory cap, when one is set
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with gradio
        return 8 * 1024**3


def plan_decode(vae, latent_frames: int, height: int, width: int, options: DecodeOptions, quality: bool,
                free: int | None = None) -> DecodePlan:
    """height/width in pixels. `free`: bytes available on the VAE's device (measured when None)."""
    free = free_bytes(vae.device) if free is None else free
    avail = max(0, free - int(options.reserve_gb * 1024**3))
    frame = full_res_frame_bytes(vae, height, width)
    if options.chunk_size > 0:
        budget = 4 * frame * options.chunk_size * vae.temporal_compression_ratio
        why = f"chunks of {options.chunk_size} latent frame(s) (FRAMEPACK_VAE_CHUNK_SIZE)"
    else:
        budget = int(min(DEFAULT_CHUNK_BUDGET, max(4 * frame, avail // 8)) * options.chunk_multiplier)
        why = f"chunk budget {budget / 1024**2:.0f} MB from {avail / 1024**3:.1f} GB available"
        if options.chunk_multiplier != 1.0:
            why += f" (x{options.chunk_multiplier:g})"

    def fits(tile: int) -> bool:
        return tile_peak_bytes(vae, tile, height, width, budget) * options.safety <= avail

    stock_tile = vae.tile_sample_min_num_frames // vae.temporal_compression_ratio  # a tile reads tile+1 latents
    if quality:
        if fits(latent_frames):
            return DecodePlan("layerwise", latent_frames, budget, f"Quality Mode: the whole section in one pass; {why}")
        for tile in range(latent_frames - 1, stock_tile, -1):
            if fits(tile + 1):
                return DecodePlan("layerwise", tile, budget, f"Quality Mode: {tile + 1}-latent tiles; {why}")
    if fits(min(stock_tile + 1, latent_frames)):
        return DecodePlan("layerwise", None, budget, f"exact layer-wise decode of the stock tiles; {why}")
    return DecodePlan("spatial-tiles", None, budget,
                      f"not even one stock tile fits ({avail / 1024**3:.1f} GB available): spatial tiles "
                      "(seams blended, not exact)")
