"""What one job asks for, validated before any model work starts."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config.loras import LoraError, parse_lora_list
from ..config.job import JobSettings, JobValueError, validate_job
from .prompts import PromptSyntaxError, parse_timed_prompt

MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs before resizing


class InputError(ValueError):
    """Bad user input; the message is one line that says what to change."""


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB, with a clear error for anything that is not one."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image file not found: {path.name}")  # the name only: never a server path
    if not path.is_file():
        raise InputError(f"not a file: {path.name}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise InputError(f"image is too large ({im.width}x{im.height}); at most {MAX_IMAGE_PIXELS} pixels")
            return np.array(im.convert("RGB"))
    except Image.DecompressionBombError as exc:  # a header claiming billions of pixels: refused before decoding
        raise InputError(f"image is too large ({str(exc).split(' pixels')[0].split('(')[-1]} pixels); at most "
                         f"{MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"not a readable image: {path.name} ({exc.__class__.__name__})") from None


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
class GenerationRequest(JobSettings):
    """One job: the prompt and the image, and every per-job control (declared once in `config.job`)."""

    prompt: str = ""
    image: np.ndarray | None = field(default=None, repr=False)
    negative_prompt: str = ""
    end_image: np.ndarray | None = field(default=None, repr=False)  # the last frame to steer toward
    keyframes: list = field(default_factory=list, repr=False)  # [(seconds, image), ...]
    extend_video: str | None = None  # a video file to continue (F1); its last frame is the image
    source_frames: np.ndarray | None = field(default=None, repr=False)  # read from extend_video by validate
    source_fps: float = 30.0
    source_name: str = ""  # the video's own file name, for the sidecar (the queue may run it from a copy)

    def validate(self) -> "GenerationRequest":
        """Check everything before any model work: one line that names the control, never a traceback."""
        if self.extend_video is not None and self.source_frames is None:
            from ..media.video import read_video  # PyAV and torch: only for a job that extends a video

            try:
                self.source_frames, self.source_fps = read_video(self.extend_video)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        if self.source_frames is not None and self.image is None:
            self.image = self.source_frames[-1]
        self.image = as_rgb(self.image)
        if self.end_image is not None:
            self.end_image = as_rgb(self.end_image)
        keyframes = []
        for item in self.keyframes or []:
            try:
                seconds, image = item
                seconds = float(seconds)
            except (TypeError, ValueError):
                raise InputError("each keyframe is a time in seconds and an image") from None
            keyframes.append((seconds, as_rgb(image)))
        self.keyframes = sorted(keyframes, key=lambda k: k[0])
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InputError("prompt must be text")
        try:
            validate_job(self)
            parse_timed_prompt(self.prompt)
            parse_lora_list(self.loras)
        except (JobValueError, PromptSyntaxError, LoraError) as exc:
            raise InputError(str(exc)) from None
        return self

    def to_record(self) -> dict:
        """Every setting, for the sidecar JSON (the image itself is saved as PNG)."""
        skip = ("image", "end_image", "keyframes", "extend_video", "source_frames", "source_fps", "source_name")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def targets_record(self) -> dict:
        """Which images beyond the start one the job has (the images themselves are saved as PNG)."""
        out = {"end_image_given": self.end_image is not None, "keyframe_seconds": [t for t, _ in self.keyframes]}
        if self.extend_video is not None:
            out.update(source_video=self.source_name or Path(self.extend_video).name,
                       source_frames=len(self.source_frames), source_fps=round(self.source_fps, 3))
        return out
