"""Cheap latent preview: a fixed per-channel linear map from the 16 latent channels to RGB."""

from __future__ import annotations

import numpy as np
import torch

# ComfyUI's HunyuanVideo latent-preview factors, rows = latent channels, cols = RGB.
_WEIGHTS = (
    (-0.0395, -0.0331, 0.0445), (0.0696, 0.0795, 0.0518), (0.0135, -0.0945, -0.0282),
    (0.0108, -0.0250, -0.0765), (-0.0209, 0.0032, 0.0224), (-0.0804, -0.0254, -0.0639),
    (-0.0991, 0.0271, -0.0669), (-0.0646, -0.0422, -0.0400), (-0.0696, -0.0595, -0.0894),
    (-0.0799, -0.0208, -0.0375), (0.1166, 0.1627, 0.0962), (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355), (-0.0270, 0.0401, -0.0821), (-0.0616, -0.0997, -0.0727),
    (0.0249, -0.0469, -0.1703),
)
_BIAS = (0.0259, -0.0192, -0.0761)


def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """(B, 16, T, H, W) latents -> uint8 image of the frames side by side, (B*H, T*W, 3)."""
    weights = torch.tensor(_WEIGHTS, dtype=torch.float32)
    bias = torch.tensor(_BIAS, dtype=torch.float32)
    rgb = torch.einsum("bcthw,cr->brthw", latents.detach().float().cpu(), weights) + bias.view(1, 3, 1, 1, 1)
    rgb = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)
    b, _, t, h, w = rgb.shape
    return rgb.permute(0, 3, 2, 4, 1).reshape(b * h, t * w, 3).numpy()
