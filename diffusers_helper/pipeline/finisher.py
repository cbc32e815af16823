"""Decode, merge and write each finished section, optionally while the next section samples.

Sampling section k+1 needs only latents, so decoding section k (GPU) and re-encoding the MP4 (CPU)
can run on a worker thread: on a side CUDA stream of the same GPU, or on a second GPU. Sections are
finished strictly in order, and `drain` waits for every submitted section, so a cancelled job still
keeps all sections that finished sampling.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from ..media.video import write_mp4
from ..vae.decode import VideoAccumulator
from .events import SectionFinished

log = logging.getLogger("framepack.finisher")


class SectionFinisher:
    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], video: VideoAccumulator,
                 write: Callable[[object], object], emit, on_frames: Callable[[int], None], t0: float,
                 background: bool = False, device: torch.device | None = None):
        self.decode = decode
        self.video = video
        self.write = write
        self.emit = emit
        self.on_frames = on_frames
        self.t0 = t0
        self.device = device
        self.background = background
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="section-finisher") if background else None
        self._pending: list[Future] = []
        self._stream = None
        self.busy_s = 0.0
        self._lock = threading.Lock()

    def _finish(self, k: int, sections: int, latents: torch.Tensor, note: str) -> None:
        start = time.perf_counter()
        if self._stream is None and self.background and self.device is not None and self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
        if self._stream is not None:
            with torch.cuda.stream(self._stream), torch.inference_mode():
                pixels = self.decode(latents)  # .cpu() inside waits for this stream only
        else:
            with torch.inference_mode():
                pixels = self.decode(latents)
        self.video.add(pixels)
        path = self.write(self.video.to_uint8())
        self.on_frames(self.video.frames)
        with self._lock:
            self.busy_s += time.perf_counter() - start
        self.emit(SectionFinished(k + 1, sections, path, self.video.frames, time.perf_counter() - self.t0, note))

    def submit(self, k: int, sections: int, latents: torch.Tensor, note: str = "") -> None:
        """latents: a CPU tensor that nobody modifies afterwards."""
        self.raise_if_failed()
        if self._pool is None:
            self._finish(k, sections, latents, note)
        else:
            self._pending.append(self._pool.submit(self._finish, k, sections, latents, note))

    def raise_if_failed(self) -> None:
        for future in [f for f in self._pending if f.done()]:
            self._pending.remove(future)
            future.result()  # re-raises the worker's exception here, on the job's thread

    def wait(self) -> None:
        """Wait until every submitted section is written (the worker is then idle); the first error is raised."""
        error = None
        for future in self._pending:
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001 - keep waiting for the rest, then raise
                error = error or exc
        self._pending = []
        if error is not None:
            raise error

    def stop_background(self) -> None:
        """Finish the next sections on the caller's thread (after an out-of-memory step-down)."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.background = False

    def drain(self) -> None:
        """Wait for every submitted section and stop the worker; the first worker error is raised."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class JobFiles:
    """The files of one job; the video is replaced section by section, never half-written."""

    def __init__(self, outputs: Path, job_id: str):
        outputs.mkdir(parents=True, exist_ok=True)
        self.outputs, self.job_id = outputs, job_id
        self.image = outputs / f"{job_id}.png"
        self.sidecar = outputs / f"{job_id}.json"
        self.video: Path | None = None

    def write_video(self, frames, crf: int) -> Path:
        path = self.outputs / f"{self.job_id}_{frames.shape[0]}.mp4"
        write_mp4(frames, path, crf=crf)
        if self.video is not None and self.video != path:
            self.video.unlink(missing_ok=True)  # the new file holds everything the old one did
        self.video = path
        return path
