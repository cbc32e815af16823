"""The job queue on disk, so a crash (kill -9, power loss) loses nothing.

`outputs/queue.json` lists the jobs not yet ended, rewritten atomically on every change of state, and each
queued job's input image waits beside it as `outputs/.queue/<job>.png`. At the next start, `recover`:
- marks a job that was running `interrupted` in its sidecar and points the sidecar at the newest complete MP4
  of its finished sections (the MP4 is replaced whole after each section, so the newest one always plays);
- hands back the queued jobs, which the queue runs again in their order;
- removes half-written temporary files (`.*.partial.*`), which a killed writer leaves behind.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..media.video import write_json, write_png

log = logging.getLogger("framepack.journal")

INTERRUPTED = "interrupted"
FILE = "queue.json"
IMAGES = ".queue"


@dataclass
class Restored:
    job_id: str
    model: str
    settings: dict  # GenerationRequest fields but the images
    image: np.ndarray
    end_image: np.ndarray | None = None
    keyframes: list | None = None  # [(seconds, image)]
    extend_video: str | None = None
    source_name: str | None = None


class Journal:
    def __init__(self, outputs_dir: str | Path):
        self.folder = Path(outputs_dir)
        self.path = self.folder / FILE

    def save_image(self, job_id: str, image: np.ndarray, end_image=None, keyframes=(), video=None) -> str | None:
        """The job's images: the input, and its end image and keyframes when it has them (their times are in the
        job's targets, `keyframe_seconds`); a video to extend is copied beside them (the upload may be gone after a
        restart). Returns the copy's path."""
        self._image(job_id).parent.mkdir(parents=True, exist_ok=True)
        copy = None
        if video is not None:
            copy = self.folder / IMAGES / f"{job_id}_source{Path(video).suffix.lower() or '.mp4'}"
            shutil.copyfile(video, copy)
        write_png(image, self._image(job_id))
        if end_image is not None:
            write_png(end_image, self._image(job_id, "end"))
        for n, (_, frame) in enumerate(keyframes, 1):
            write_png(frame, self._image(job_id, f"keyframe{n}"))
        return str(copy) if copy else None

    def write(self, jobs: list[dict]) -> None:
        """`jobs`: the open jobs, oldest first, as {job_id, model, state, settings}."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json({"format": 1, "jobs": jobs}, self.path)
        except OSError as exc:  # a full disk must not stop the queue; the next change tries again
            log.error("Could not save the queue to %s: %s", self.path.name, exc.strerror or exc)

    def forget(self, job_id: str) -> None:
        for path in [self._image(job_id), *(self.folder / IMAGES).glob(f"{job_id}_*.*")]:
            path.unlink(missing_ok=True)

    def _image(self, job_id: str, part: str = "") -> Path:
        return self.folder / IMAGES / (f"{job_id}_{part}.png" if part else f"{job_id}.png")

    def recover(self) -> list[Restored]:
        """Settle what a previous run left: interrupted jobs, queued jobs to run again, partial files."""
        if not self.folder.is_dir():
            return []
        for partial in [*self.folder.glob(".*.partial.*"), *self.folder.glob(f"{IMAGES}/.*.partial.*")]:
            partial.unlink(missing_ok=True)
            log.info("Removed the half-written %s left by a stopped process", partial.name)
        try:
            jobs = json.loads(self.path.read_text())["jobs"] if self.path.is_file() else []
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("The saved queue %s is unreadable; starting with an empty queue", self.path.name)
            jobs = []
        restored = []
        for job in jobs if isinstance(jobs, list) else []:
            job_id = str(job.get("job_id", "")) if isinstance(job, dict) else ""
            if not re.fullmatch(r"[\w-]+", job_id):
                continue
            if job.get("state") == "running":
                self._interrupted(job_id)
                self.forget(job_id)
            elif job.get("state") == "queued":
                settings = dict(job.get("settings") or {})
                targets = job.get("targets") if isinstance(job.get("targets"), dict) else {}
                image = self._load_image(job_id)
                end = self._load_image(job_id, "end") if targets.get("end_image_given") else None
                times = list(targets.get("keyframe_seconds") or [])
                frames = [self._load_image(job_id, f"keyframe{n}") for n in range(1, len(times) + 1)]
                if image is not None and (end is not None or not targets.get("end_image_given")) and \
                        all(f is not None for f in frames):
                    source = next((self.folder / IMAGES).glob(f"{job_id}_source.*"), None)
                    restored.append(Restored(job_id, str(job.get("model", "")), settings, image, end,
                                             list(zip(times, frames)), str(source) if source else None,
                                             targets.get("source_video")))
        self._sidecars_left_running()
        if restored:
            log.info("Restored %d queued job(s) from the last run", len(restored))
        return restored

    def _load_image(self, job_id: str, part: str = "") -> np.ndarray | None:
        from PIL import Image

        try:
            with Image.open(self._image(job_id, part)) as im:
                return np.array(im.convert("RGB"))
        except OSError:
            log.warning("The input image of queued job %s is missing; the job is dropped", job_id)
            return None

    def _interrupted(self, job_id: str) -> None:
        sidecar = self.folder / f"{job_id}.json"
        try:
            record = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            record = {"job_id": job_id}
        videos = sorted(self.folder.glob(f"{job_id}_*.mp4"), key=lambda p: p.stat().st_mtime)
        record.update(status=INTERRUPTED, error="the app stopped while this job was running",
                      video=str(videos[-1]) if videos else None)
        try:
            write_json(record, sidecar)
        except OSError as exc:
            log.error("Could not mark job %s interrupted: %s", job_id, exc.strerror or exc)
        log.info("Job %s was running when the app stopped: marked interrupted%s", job_id,
                 f", keeping {videos[-1].name}" if videos else "")

    def _sidecars_left_running(self) -> None:
        """A sidecar still 'running' whose job the journal did not know (a journal lost with the disk)."""
        for sidecar in self.folder.glob("*.json"):
            if sidecar.name == FILE:
                continue
            try:
                record = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("status") == "running" and record.get("job_id"):
                self._interrupted(str(record["job_id"]))
