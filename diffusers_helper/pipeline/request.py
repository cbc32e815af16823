"""What one job asks for, validated before any model work starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_SECONDS = 120.0
MAX_STEPS = 100
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs before resizing


class InputError(ValueError):
    """Bad user input; the message is one line that says what to change."""


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB, with a clear error for anything that is not one."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise InputError(f"image is too large ({im.width}x{im.height}); at most {MAX_IMAGE_PIXELS} pixels")
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"not a readable image: {path} ({exc.__class__.__name__})") from None


def as_rgb(image) -> np.ndarray:
    """Accept a path, a PIL image or an array (gray, RGB or RGBA) and return uint8 HxWx3."""
    if image is None:
        raise InputError("no input image: upload or choose an image first")
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"image must be HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape[0] < 16 or arr.shape[1] < 16:
        raise InputError(f"image is too small ({arr.shape[1]}x{arr.shape[0]}); at least 16x16 pixels")
    if arr.shape[0] * arr.shape[1] > MAX_IMAGE_PIXELS:
        raise InputError(f"image is too large ({arr.shape[1]}x{arr.shape[0]}); at most {MAX_IMAGE_PIXELS} pixels")
    if max(arr.shape[:2]) > 16 * min(arr.shape[:2]):
        raise InputError(f"image is too thin ({arr.shape[1]}x{arr.shape[0]}); the longer side can be at most 16 "
                         "times the shorter")
    return np.ascontiguousarray(arr[..., :3])


@dataclass
class GenerationRequest:
    prompt: str
    image: np.ndarray | None = field(default=None, repr=False)
    negative_prompt: str = ""
    seed: int = 31337
    seconds: float = 5.0
    latent_window_size: int = 9
    steps: int = 25
    cfg: float = 1.0
    gs: float = 10.0
    rs: float = 0.0
    use_teacache: bool = True
    teacache_threshold: float = 0.15
    gpu_memory_preservation_gb: float = 6.0
    mp4_crf: int = 16
    quality_mode: bool = False  # decode each section in as few temporal tiles as memory allows
    # performance controls (the UI's "Performance Tuning"); defaults come from the settings
    aggressive_gpu: bool = False  # larger decode chunks, less VRAM kept in reserve
    keep_models_in_gpu: bool = False  # never move a model back to the CPU between stages
    chunk_size_multiplier: float = 1.0  # scales the auto-sized decode chunks
    max_chunk_size: int = 2048  # query tokens per attention call in the VAE mid block
    cpu_offload_threshold_gb: float = 6.0  # move models to the CPU only above this much VRAM in use
    mixed_precision: bool = True  # False computes the transformer in float32
    batch_processing: bool = False  # run both CFG branches in one batch when CFG > 1
    resolution: int | None = None  # None: the model's default (640 for the real models)

    def validate(self) -> "GenerationRequest":
        self.image = as_rgb(self.image)
        checks = [
            (isinstance(self.prompt, str), "prompt must be text"),
            (math.isfinite(self.seconds) and 0 < self.seconds <= MAX_SECONDS,
             f"video length must be between 0 and {MAX_SECONDS:g} seconds, got {self.seconds:g}"),
            (isinstance(self.steps, int) and 1 <= self.steps <= MAX_STEPS,
             f"steps must be between 1 and {MAX_STEPS}, got {self.steps}"),
            (isinstance(self.latent_window_size, int) and 1 <= self.latent_window_size <= 33,
             f"latent window size must be between 1 and 33, got {self.latent_window_size}"),
            (0 <= self.seed < 2**63, f"seed must be between 0 and 2^63-1, got {self.seed}"),
            (math.isfinite(self.cfg) and 1.0 <= self.cfg <= 32.0, f"CFG must be between 1 and 32, got {self.cfg}"),
            (math.isfinite(self.gs) and 0.0 <= self.gs <= 32.0,
             f"distilled CFG must be between 0 and 32, got {self.gs}"),
            (0.0 <= self.rs <= 1.0, f"CFG rescale must be between 0 and 1, got {self.rs}"),
            (self.teacache_threshold >= 0, f"TeaCache threshold must be >= 0, got {self.teacache_threshold}"),
            (0 <= self.mp4_crf <= 51, f"MP4 CRF must be between 0 and 51, got {self.mp4_crf}"),
            (self.resolution is None or 64 <= self.resolution <= 2048,
             f"resolution must be between 64 and 2048, got {self.resolution}"),
            (0.5 <= self.chunk_size_multiplier <= 3.0,
             f"chunk size multiplier must be between 0.5 and 3, got {self.chunk_size_multiplier}"),
            (1024 <= self.max_chunk_size <= 8192, f"max chunk size must be between 1024 and 8192, got "
                                                   f"{self.max_chunk_size}"),
            (0 <= self.cpu_offload_threshold_gb <= 128,
             f"CPU offload threshold must be between 0 and 128 GB, got {self.cpu_offload_threshold_gb}"),
            (0 <= self.gpu_memory_preservation_gb <= 128,
             f"GPU memory preservation must be between 0 and 128 GB, got {self.gpu_memory_preservation_gb}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        return self

    def to_record(self) -> dict:
        """Every setting, for the sidecar JSON (the image itself is saved as PNG)."""
        record = asdict(self)
        record.pop("image")
        return record
