"""Writing results: MP4 through PyAV, the input PNG, and the JSON sidecar.

Every file is written under a temporary name and renamed into place, so a crash or a cancel never
leaves a half-written file that looks finished.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

FPS = 30


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, as the original rounds it."""
    x = torch.clamp(pixels.float(), -1.0, 1.0) * 127.5 + 127.5
    return x.detach().cpu().to(torch.uint8)[0].permute(1, 2, 3, 0).numpy()


def write_mp4(frames: np.ndarray, path: Path, crf: int = 16, fps: int = FPS) -> Path:
    """H.264, yuv420p; even dimensions are required by the encoder, so odd ones are padded by one."""
    path = Path(path)
    tmp = _partial(path)
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf))}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def write_png(image: np.ndarray, path: Path) -> Path:
    path = Path(path)
    tmp = _partial(path)
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def write_json(data: dict, path: Path) -> Path:
    path = Path(path)
    tmp = _partial(path)
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_video_info(path: Path) -> tuple[int, float, tuple[int, int]]:
    """(decoded frame count, frames per second, (height, width)) — for tests and the UI gallery."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, float(stream.average_rate), (stream.height, stream.width)


MAX_SOURCE_FRAMES = 3600  # two minutes at 30 fps: a video to extend is held in memory as uint8


def read_video(path: Path, max_frames: int = MAX_SOURCE_FRAMES) -> tuple[np.ndarray, float]:
    """(frames (T, H, W, 3) uint8, frames per second) of a video file; ValueError with one line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"video file not found: {path.name}")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path.name} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or FPS)
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) > max_frames:
                    raise ValueError(f"{path.name} is too long to extend (more than {max_frames} frames)")
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"not a readable video: {path.name} ({exc.__class__.__name__})") from None
    if not frames:
        raise ValueError(f"{path.name} has no frames")
    return np.stack(frames), fps


WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EROFS: "the file system is read-only"}


def describe_write_error(exc: OSError) -> str:
    """One line for a failed write: the file's name (never its server path) and why."""
    reason = WRITE_ERRORS.get(exc.errno, exc.strerror or exc.__class__.__name__)
    name = Path(exc.filename).name if exc.filename else "the output files"
    return f"Could not write {name}: {reason}"
