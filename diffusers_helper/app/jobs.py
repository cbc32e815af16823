"""A queue of generation jobs with state anyone can read, run one at a time on a worker thread, or several at a
time on a pool of workers (`parallel.pool`, one per GPU): the queue keeps the order, the states and the journal,
the runner only runs the job it is handed.

The web page only polls snapshots, so a reload (or a second tab) reattaches to the running job; the
API can wait for a job to end. Past jobs are found again from their JSON sidecars on disk.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from ..pipeline.engine import new_job_id
from ..pipeline.events import Cancelled, Failed, Finished, SectionFinished, Stage, StepProgress, one_line
from ..pipeline.request import GenerationRequest, InputError
from ..pipeline.sampling import CancelToken
from .access import inside
from .journal import INTERRUPTED, Journal

log = logging.getLogger("framepack.jobs")

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED = "queued", "running", "finished", "failed", "cancelled"
ENDED = (FINISHED, FAILED, CANCELLED)
ALL = object()  # a viewer who sees every job: no authentication, or an admin


def _visible(snap, viewer) -> bool:
    return viewer is ALL or snap.owner == viewer


@dataclass(frozen=True)
class JobSnapshot:
    job_id: str
    model: str
    prompt: str
    state: str = QUEUED
    stage: str = "Waiting in the queue"
    fraction: float = 0.0
    section: int = 0
    sections: int = 0
    step: int = 0
    steps: int = 0
    preview: np.ndarray | None = field(default=None, repr=False)
    video: str | None = None
    frames: int = 0
    error: str | None = None
    sidecar: str | None = None
    submitted: float = 0.0
    started: float | None = None
    ended: float | None = None
    version: int = 0  # bumps on every change, so pollers can skip unchanged states
    owner: str | None = None  # the signed-in user who submitted it (None without authentication)
    worker: str | None = None  # the pool worker running it, and its GPU (None: the in-process worker)
    gpu: str | None = None

    @property
    def elapsed_s(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.time()) - self.started

    @property
    def eta_s(self) -> float | None:
        if self.state != RUNNING or self.fraction <= 0.01:
            return None
        return self.elapsed_s * (1 - self.fraction) / self.fraction


@dataclass
class _Job:
    snapshot: JobSnapshot
    request: GenerationRequest
    cancel: CancelToken = field(default_factory=CancelToken)


class InProcess:
    """The runner without a pool: one job at a time on the queue's own thread, with the provider's engine."""

    size = 1

    def __init__(self, provider):
        self.provider = provider

    def label(self, index: int) -> tuple[str | None, str | None]:
        return None, None

    def choose(self, idle: list[int], model: str, request) -> int | None:
        return idle[0] if idle else None

    def run(self, index: int, job_id: str, model: str, request, emit, cancel, owner: str | None = None) -> None:
        try:
            engine = self.provider.get(model)
        except Exception as exc:  # noqa: BLE001 - one line for the user, the trace in the log
            log.exception("Loading %s failed", model)
            emit(Failed(str(exc).splitlines()[0], None, None))
            return
        if cancel.cancelled:
            emit(Cancelled(None, None))
            return
        engine.generate(request, emit, cancel, job_id=job_id, **({"owner": owner} if owner else {}))


class JobQueue:
    """With `outputs_dir`, the open jobs are kept on disk (`journal.Journal`): after a crash the queued jobs run
    again and the interrupted one keeps its finished sections. With `pool` (`parallel.pool.WorkerPool`), up to
    `pool.size` jobs run at once, each on the worker the pool chooses for it."""

    def __init__(self, provider, max_queued: int = 32, outputs_dir: str | Path | None = None, pool=None):
        self.provider = provider
        self.runner = pool if pool is not None else InProcess(provider)
        self.max_queued = max_queued
        self._jobs: dict[str, _Job] = {}
        self._order: list[str] = []
        self._busy: set[int] = set()  # the runner's workers running a job
        self._cond = threading.Condition()
        self._stop = False
        self.journal = Journal(outputs_dir) if outputs_dir is not None else None
        for job in self.journal.recover() if self.journal else []:
            self._restore(job)
        self._worker = threading.Thread(target=self._run, name="job-queue", daemon=True)
        self._worker.start()

    def _restore(self, job) -> None:
        known = {f.name for f in fields(GenerationRequest)} - {"image", "end_image", "keyframes", "extend_video",
                                                               "source_frames", "source_fps", "source_name"}
        request = GenerationRequest(image=None if job.extend_video else job.image, end_image=job.end_image,
                                    keyframes=job.keyframes or [], extend_video=job.extend_video,
                                    source_name=job.source_name or "",
                                    **{k: v for k, v in job.settings.items() if k in known})
        try:
            request.validate()
        except InputError as exc:
            log.warning("Queued job %s from the last run is dropped: %s", job.job_id, exc)
            return
        self._add(JobSnapshot(job_id=job.job_id, model=job.model, prompt=request.prompt, submitted=time.time(),
                              stage="Waiting in the queue (restored after a restart)"), request)

    def _add(self, snap: JobSnapshot, request: GenerationRequest) -> None:
        """Append a queued job and save the queue (caller holds the condition, or nothing runs yet)."""
        self._jobs[snap.job_id] = _Job(snap, request)
        self._order.append(snap.job_id)
        self._save()

    def _save(self) -> None:
        """Write the open jobs to the journal (caller holds the condition, or nothing runs yet)."""
        if self.journal is None:
            return
        open_jobs = [self._jobs[j] for j in self._order if self._jobs[j].snapshot.state not in ENDED]
        self.journal.write([{"job_id": j.snapshot.job_id, "model": j.snapshot.model, "state": j.snapshot.state,
                             "settings": j.request.to_record(), "targets": j.request.targets_record()}
                            for j in open_jobs])

    # -- public -----------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, model: str, owner: str | None = None) -> str:
        """Validate and enqueue; raises InputError with a one-line message for bad input."""
        request.validate()
        with self._cond:
            waiting = sum(1 for j in self._jobs.values() if j.snapshot.state == QUEUED)
            if waiting >= self.max_queued:
                raise InputError(f"the queue is full ({self.max_queued} jobs waiting); wait or cancel some")
            job_id = new_job_id()
            if self.journal is not None:
                copy = self.journal.save_image(job_id, request.image, request.end_image, request.keyframes,
                                               request.extend_video)
                if copy:  # the journal's copy: it outlives the upload
                    request.source_name = request.source_name or Path(request.extend_video).name
                    request.extend_video = copy
            self._add(JobSnapshot(job_id=job_id, model=model, prompt=request.prompt, submitted=time.time(),
                                  owner=owner), request)
            self._cond.notify_all()
        log.info("Queued job %s (%s)", job_id, model)
        return job_id

    def cancel(self, job_id: str) -> bool:
        """Stop a running job after its current step, or drop a queued one. False if it already ended."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.snapshot.state in ENDED:
                return False
            job.cancel.cancel()
            if job.snapshot.state == QUEUED:
                self._update(job, state=CANCELLED, stage="Cancelled before it started", ended=time.time())
            return True

    def cancel_running(self, viewer=ALL) -> bool:
        current = self.running(viewer)
        return self.cancel(current.job_id) if current else False

    def get(self, job_id: str, viewer=ALL) -> JobSnapshot | None:
        """The job, if `viewer` may see it: `ALL` (no authentication, or an admin) sees every job, a user name
        only that user's."""
        with self._cond:
            job = self._jobs.get(job_id)
            return job.snapshot if job and _visible(job.snapshot, viewer) else None

    def running(self, viewer=ALL) -> JobSnapshot | None:
        return next((s for s in self.jobs(viewer) if s.state == RUNNING), None)

    def latest(self, viewer=ALL) -> JobSnapshot | None:
        """The running job, else the one that started last, else the last one submitted."""
        snaps = self.jobs(viewer)
        if not snaps:
            return None
        run = next((j for j in snaps if j.state == RUNNING), None)
        started = [j for j in snaps if j.started is not None]
        return run or (max(started, key=lambda j: j.started) if started else snaps[-1])

    def jobs(self, viewer=ALL) -> list[JobSnapshot]:
        with self._cond:
            return [self._jobs[j].snapshot for j in self._order if _visible(self._jobs[j].snapshot, viewer)]

    def wait(self, job_id: str, timeout: float | None = None) -> JobSnapshot:
        deadline = None if timeout is None else time.time() + timeout
        with self._cond:
            while self._jobs[job_id].snapshot.state not in ENDED:
                remaining = None if deadline is None else deadline - time.time()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(timeout=remaining)
            return self._jobs[job_id].snapshot

    def close(self) -> None:
        with self._cond:
            self._stop = True
            for job in self._jobs.values():
                job.cancel.cancel()
            self._cond.notify_all()
        self._worker.join(timeout=60)

    # -- worker -----------------------------------------------------------------------------------------

    def _update(self, job: _Job, **changes) -> None:
        """Caller holds the condition."""
        job.snapshot = replace(job.snapshot, version=job.snapshot.version + 1, **changes)
        if "state" in changes:  # the journal follows the states, not every step
            self._save()
            if changes["state"] in ENDED and self.journal is not None:
                self.journal.forget(job.snapshot.job_id)
        self._cond.notify_all()

    def _next(self) -> tuple[_Job, int] | None:
        """The oldest queued job and the idle worker the runner chooses for it, marked running."""
        with self._cond:
            while not self._stop:
                idle = [i for i in range(self.runner.size) if i not in self._busy]
                job = next((self._jobs[j] for j in self._order if self._jobs[j].snapshot.state == QUEUED), None)
                slot = self.runner.choose(idle, job.snapshot.model, job.request) if job and idle else None
                if slot is not None:
                    self._busy.add(slot)
                    worker, gpu = self.runner.label(slot)
                    self._update(job, state=RUNNING, stage="Loading models", started=time.time(), worker=worker,
                                 gpu=gpu)
                    return job, slot
                self._cond.wait(timeout=5)
            return None

    def _on_event(self, job: _Job, event) -> None:
        with self._cond:
            if isinstance(event, Stage):
                self._update(job, stage=event.message)
            elif isinstance(event, StepProgress):
                self._update(job, fraction=event.fraction, section=event.section, sections=event.sections,
                             step=event.step, steps=event.steps, preview=event.preview,
                             stage=f"Sampling section {event.section}/{event.sections}")
            elif isinstance(event, SectionFinished):
                self._update(job, video=str(event.video_path), frames=event.frames,
                             stage=f"Section {event.section}/{event.sections} done: {event.frames} frames"
                                   + (f" ({event.cache_note})" if event.cache_note else ""))
            elif isinstance(event, Finished):
                self._update(job, state=FINISHED, fraction=1.0, video=str(event.video_path), frames=event.frames,
                             sidecar=str(event.sidecar_path), ended=time.time(),
                             stage=f"Finished: {event.frames} frames in {event.elapsed_s:.1f} s")
            elif isinstance(event, Cancelled):
                self._update(job, state=CANCELLED, ended=time.time(), sidecar=str(event.sidecar_path or ""),
                             video=str(event.video_path) if event.video_path else job.snapshot.video,
                             stage="Stopped" + (f"; kept {event.video_path}" if event.video_path else ""))
            elif isinstance(event, Failed):
                self._update(job, state=FAILED, error=event.error, ended=time.time(),
                             video=str(event.video_path) if event.video_path else job.snapshot.video,
                             stage=f"Failed: {event.error}")

    def _run(self) -> None:
        """Hand each job to a worker: on this thread with one worker (as ever), else on a thread per job."""
        threads: list[threading.Thread] = []
        while (picked := self._next()) is not None:
            if self.runner.size == 1:
                self._execute(*picked)
                continue
            threads = [t for t in threads if t.is_alive()]
            threads.append(threading.Thread(target=self._execute, args=picked, daemon=True,
                                            name=f"job-{picked[0].snapshot.job_id}"))
            threads[-1].start()
        for thread in threads:
            thread.join(timeout=60)

    def _execute(self, job: _Job, slot: int) -> None:
        try:
            self.runner.run(slot, job.snapshot.job_id, job.snapshot.model, job.request,
                            lambda e, job=job: self._on_event(job, e), job.cancel, job.snapshot.owner)
        except Exception as exc:  # noqa: BLE001 - one job fails, the queue goes on with the next
            log.exception("Job %s failed outside the engine's own handling", job.snapshot.job_id)
            self._on_event(job, Failed(one_line(exc), None, None))
        finally:
            if job.snapshot.state not in ENDED:  # the runner ended without a terminal event
                self._on_event(job, Failed("the job ended without a result", None, None))
            with self._cond:
                self._busy.discard(slot)
                self._cond.notify_all()


def past_jobs(outputs_dir: str | Path, limit: int = 50, viewer=ALL) -> list[dict]:
    """Finished or stopped jobs with a video, newest first, read from their sidecars. Only videos inside the
    outputs folder are listed: a sidecar pointing anywhere else (edited, or copied from another machine) is
    skipped and logged, so the gallery never serves a file from elsewhere on the server."""
    out = []
    folder = Path(outputs_dir).resolve()
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(record, dict) or record.get("status") not in (FINISHED, CANCELLED, INTERRUPTED):
            continue
        if viewer is not ALL and record.get("owner") != viewer:
            continue
        video = inside(record.get("video"), folder)
        if video is None or not video.is_file():
            if record.get("video"):
                log.warning("Past videos: skipping %s, whose video is not a file in the outputs folder", path.name)
            continue
        record.update(video=str(video), sidecar=str(path))
        record["settings"] = record.get("settings") if isinstance(record.get("settings"), dict) else {}
        out.append(record)
        if len(out) >= limit:
            break
    return out
