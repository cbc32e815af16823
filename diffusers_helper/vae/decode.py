"""Latents to pixels, one section at a time, blended into the video decoded so far."""

from __future__ import annotations

import logging

import numpy as np
import torch

from .chunked import LayerwiseDecoder, decode_exact, stock_tiling, tiled_decode
from .plan import DecodeOptions, DecodePlan, plan_decode
from .trt import TensorRTTileDecoder
from ..media.video import pixels_to_uint8

log = logging.getLogger("framepack.vae")


def vae_decode(latents: torch.Tensor, vae) -> torch.Tensor:
    """The original's decode: unscale, `vae.decode` (diffusers' own temporal tiles), pixels on the CPU."""
    latents = latents / vae.config.scaling_factor
    return vae.decode(latents.to(device=vae.device, dtype=vae.dtype)).sample.cpu()


class SectionDecoder:
    """Decodes each section's newest latents the way the options and free memory allow.

    Backends: "exact" (layer-wise, equal to `vae.decode` within float rounding, small peak memory),
    "stock" (`vae.decode` itself), "compiled" (stock with a torch.compile'd decoder), "tensorrt" (a
    TensorRT engine per tile shape, falling back to "exact" on any error).
    """

    def __init__(self, vae, options: DecodeOptions | None = None):
        self.vae = vae
        self.options = options or DecodeOptions()
        self.last_plan: DecodePlan | None = None
        self._trt = None
        self._compiled = False
        if self.options.backend not in ("exact", "stock", "compiled", "tensorrt"):
            raise ValueError(f"unknown VAE backend {self.options.backend!r}")

    def _exact_tile(self, budget: int):
        return LayerwiseDecoder(self.vae, budget, self.options.max_attention_tokens).decode_tile

    def decode(self, latents: torch.Tensor, quality: bool = False) -> torch.Tensor:
        vae = self.vae
        z = (latents / vae.config.scaling_factor).to(device=vae.device, dtype=vae.dtype)
        backend = self.options.backend
        with torch.no_grad():
            if backend in ("stock", "compiled"):
                if backend == "compiled" and not self._compiled:
                    vae.decoder = torch.compile(vae.decoder, dynamic=False)
                    self._compiled = True
                    log.info("torch.compile enabled for the VAE decoder")
                return vae.decode(z).sample.cpu()
            _, _, frames, h, w = z.shape
            scale = self.options.upscale_factor
            plan = plan_decode(vae, frames, h * scale, w * scale, self.options, quality)
            if plan != self.last_plan:
                log.info("VAE decode: %s", plan.reason)
            self.last_plan = plan
            if plan.method == "spatial-tiles":
                return self._spatial_tiles(z)
            try:
                return self._planned(z, plan, backend)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                log.warning("Out of GPU memory while decoding; retrying this section with spatial tiles")
                self.last_plan = DecodePlan("spatial-tiles", None, plan.chunk_budget_bytes,
                                            "out of memory in the planned decode: spatial tiles (not exact)")
                return self._spatial_tiles(z)

    def _planned(self, z: torch.Tensor, plan: DecodePlan, backend: str) -> torch.Tensor:
        vae = self.vae
        tile_fn = self._exact_tile(plan.chunk_budget_bytes)
        if backend == "tensorrt" and plan.tile_latents is None:
            if self._trt is None:
                o = self.options
                self._trt = TensorRTTileDecoder(vae, tile_fn, cache_dir=o.tensorrt_cache_dir,
                                                workspace_mb=o.trt_workspace_mb, aux_streams=o.trt_max_aux_streams,
                                                max_cached_shapes=o.trt_max_cached_shapes)
            self._trt.fallback = tile_fn
            tile, stride = stock_tiling(vae)
            return tiled_decode(vae, z, tile, stride, self._trt).cpu()
        return decode_exact(vae, z, plan.chunk_budget_bytes, plan.tile_latents,
                            self.options.max_attention_tokens).cpu()

    def _spatial_tiles(self, z: torch.Tensor) -> torch.Tensor:
        was = self.vae.use_tiling
        self.vae.enable_tiling()
        try:
            return self.vae.decode(z).sample.cpu()
        finally:
            if not was:
                self.vae.disable_tiling()


def soft_append(earlier: torch.Tensor, later: torch.Tensor, overlap: int) -> torch.Tensor:
    """Join two clips in time, cross-fading `overlap` frames linearly from `earlier` to `later`."""
    if overlap <= 0:
        return torch.cat([earlier, later], dim=2)
    if earlier.shape[2] < overlap or later.shape[2] < overlap:
        raise ValueError(f"clips of {earlier.shape[2]} and {later.shape[2]} frames cannot overlap by {overlap}")
    w = torch.linspace(1, 0, overlap, dtype=earlier.dtype, device=earlier.device).view(1, 1, -1, 1, 1)
    blended = w * earlier[:, :, -overlap:] + (1 - w) * later[:, :, :overlap].to(earlier)
    return torch.cat([earlier[:, :, :-overlap], blended, later[:, :, overlap:].to(earlier)], dim=2)


class VideoAccumulator:
    """The decoded video so far, kept as uint8 except the frames the next section will blend into.

    Inverted sections are earlier in time than the video so far (they blend into its first frames);
    F1 sections are later (they blend into its last frames). Only those `overlap` frames are kept in
    float, so a 2-minute video costs uint8 memory, and the output equals blending everything in float.
    """

    def __init__(self, mode: str, overlap: int, start: np.ndarray | None = None):
        """`start`: frames (T, H, W, 3) uint8 the video begins with (a video being extended, F1)."""
        self.mode = mode
        self.overlap = overlap
        self._edge: torch.Tensor | None = None  # (1, 3, overlap, H, W) float, [-1, 1]
        self._settled: list[np.ndarray] = []  # uint8 (T, H, W, 3) chunks, in time order
        if start is not None:
            ov = min(overlap, len(start))
            self._settled = [start[: len(start) - ov]]
            edge = torch.from_numpy(np.ascontiguousarray(start[len(start) - ov:])).float() / 127.5 - 1
            self._edge = edge.permute(3, 0, 1, 2)[None]

    def add(self, pixels: torch.Tensor) -> None:
        pixels = pixels.float()
        if self._edge is not None:
            if self.mode == "inverted":
                pixels = soft_append(pixels, self._edge, self.overlap)
            else:
                pixels = soft_append(self._edge, pixels, self.overlap)
        ov = min(self.overlap, pixels.shape[2])
        if self.mode == "inverted":
            self._edge, rest = pixels[:, :, :ov], pixels[:, :, ov:]
            self._settled.insert(0, pixels_to_uint8(rest))
        else:
            rest, self._edge = pixels[:, :, : pixels.shape[2] - ov], pixels[:, :, pixels.shape[2] - ov:]
            self._settled.append(pixels_to_uint8(rest))

    @property
    def frames(self) -> int:
        edge = 0 if self._edge is None else self._edge.shape[2]
        return edge + sum(chunk.shape[0] for chunk in self._settled)

    def to_uint8(self) -> np.ndarray:
        edge = [pixels_to_uint8(self._edge)] if self._edge is not None else []
        chunks = edge + self._settled if self.mode == "inverted" else self._settled + edge
        return np.concatenate(chunks, axis=0)
