"""Resolution buckets and the cover-resize + center-crop the original applies to the input image."""

from __future__ import annotations

import numpy as np
from PIL import Image

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
