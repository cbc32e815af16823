"""Latents to pixels, one section at a time, blended into the video decoded so far."""

from __future__ import annotations

import numpy as np
import torch

from .video import pixels_to_uint8


def vae_decode(latents: torch.Tensor, vae) -> torch.Tensor:
    """Unscale and decode (B, 16, T, H, W) latents to pixels in [-1, 1] on the CPU."""
    latents = latents / vae.config.scaling_factor
    return vae.decode(latents.to(device=vae.device, dtype=vae.dtype)).sample.cpu()


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

    def __init__(self, mode: str, overlap: int):
        self.mode = mode
        self.overlap = overlap
        self._edge: torch.Tensor | None = None  # (1, 3, overlap, H, W) float, [-1, 1]
        self._settled: list[np.ndarray] = []  # uint8 (T, H, W, 3) chunks, in time order

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
