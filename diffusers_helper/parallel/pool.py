"""A pool of workers on Ray, one per GPU, each running whole jobs with its own models.

The app's job queue keeps the jobs, their order and the journal; this pool only runs a job on the worker the queue
asked for (`choose`, then `run`). `run` streams the worker's events back by long-polling the actor, forwards a
cancel to the worker running that job, and when the worker dies fails only that job (its finished sections are
kept) and starts a new worker in its place. Ray is imported only here and only when a pool starts.

Load balancing (`choose`): an idle worker whose loaded model and LoRA set match the job, else one with the same
model, else one with nothing loaded yet, else the idle worker that has been busy the least so far.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import secrets
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from ..media.video import write_json
from ..pipeline.events import TERMINAL, Failed
from .worker import PROBE, PoolWorker, Shipped, lora_key

log = logging.getLogger("framepack.pool")

ENV_PREFIXES = ("FRAMEPACK_", "HF_", "PYTORCH_", "TORCHINDUCTOR_", "TRITON_")  # what workers need of ours


class PoolError(RuntimeError):
    """The pool's workers could not start; one line for the user."""


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def start_pool(make_provider, outputs_dir: str | Path, workers: int = 0, address: str = "", *,
               local_gpus: int | None = None, **kwargs) -> "WorkerPool | None":
    """The pool the settings ask for, or None for the in-process worker; the log says which and why.

    workers: 0 = one per GPU (locally only with two GPUs or more; with `address`, one per GPU of the cluster),
    1 = the in-process worker, N = N workers (CPU workers where the cluster has no GPU)."""
    if workers == 1:
        log.info("Job pool: one in-process worker (workers = 1)")
        return None
    if not ray_installed():
        log.info("Job pool: Ray not installed; one in-process worker%s",
                 " (pip install ray to run several workers)" if workers > 1 or address else "")
        return None
    if workers == 0 and not address:
        gpus = local_gpu_count() if local_gpus is None else local_gpus
        if gpus <= 1:
            log.info("Job pool: %s; one in-process worker", "one GPU" if gpus == 1 else "no GPU")
            return None
    return WorkerPool(make_provider, outputs_dir, workers, address, **kwargs)


@dataclass
class _Slot:
    actor: object
    name: str
    gpu: str
    host: str
    pid: int
    shared: bool
    loaded: tuple = (None, "")  # (model, LoRA set)
    busy_s: float = 0.0
    dead: bool = False  # could not be restarted: never chosen


class WorkerPool:
    def __init__(self, make_provider, outputs_dir: str | Path, workers: int = 0, address: str = "", *,
                 quiet: bool = False, share: str = "auto", num_cpus: int | None = None,
                 start_timeout_s: float = 600.0):
        import ray

        self.outputs = Path(outputs_dir).resolve()
        self.make_provider, self.share, self.start_timeout_s = make_provider, share, start_timeout_s
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
            root = str(Path(__file__).resolve().parents[2])  # the checkout: workers import diffusers_helper
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            common = dict(include_dashboard=False, log_to_driver=not quiet, runtime_env={"env_vars": env},
                          logging_level=logging.WARNING if quiet else logging.INFO)
            with warnings.catch_warnings():  # Ray's notice of a future default for CPU-only actors
                warnings.simplefilter("ignore", FutureWarning)
                if address:
                    ray.init(address=address, **common)
                else:
                    ray.init(address="local", num_cpus=num_cpus, **common)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or gpus
        if gpus and count > gpus:
            log.warning("Job pool: %d workers asked for, the Ray cluster has %d GPUs; starting %d", count, gpus, gpus)
            count = gpus
        if not gpus:
            log.info("Job pool: no GPU in the Ray cluster; the workers run on the CPU")
        self._cls = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_concurrency=4, max_restarts=0)(PoolWorker)
        self.outputs.mkdir(parents=True, exist_ok=True)
        self._token = secrets.token_hex(16)
        (self.outputs / PROBE).write_text(self._token)
        actors = [self._new_actor(f"w{i}") for i in range(count)]
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=start_timeout_s)
        except Exception as exc:  # noqa: BLE001 - cannot be scheduled (no free GPU or CPU), or died while starting
            self.close()
            raise PoolError(f"the job pool's workers did not start: {str(exc).splitlines()[0]}") from None
        self._slots = [self._slot(a, info) for a, info in zip(actors, infos)]
        hosts = {s.host for s in self._slots}
        where = ", ".join(s.gpu + (f" on {s.host}" if len(hosts) > 1 else "") for s in self._slots)
        log.info("Job pool: %d Ray workers (%s)%s", len(self._slots), where, "" if address else ", local Ray")
        copying = [s.name for s in self._slots if not s.shared]
        log.info("Job pool: output folder %s", f"not shared with {', '.join(copying)}: their files are sent to "
                 "the head" if copying else "shared: workers write into it")

    # -- what the job queue calls ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._slots)

    def label(self, index: int) -> tuple[str, str]:
        """(worker, GPU) for the queue view and the job's snapshot."""
        s = self._slots[index]
        return s.name, s.gpu if len({t.host for t in self._slots}) == 1 else f"{s.gpu} on {s.host}"

    def choose(self, idle: list[int], model: str, request) -> int | None:
        slots = [i for i in idle if not self._slots[i].dead]
        if not slots:
            return None
        key = (model, lora_key(request))
        for fits in (lambda s: s.loaded == key, lambda s: s.loaded[0] == model, lambda s: s.loaded[0] is None):
            matching = [i for i in slots if fits(self._slots[i])]
            if matching:
                return min(matching, key=lambda i: self._slots[i].busy_s)
        return min(slots, key=lambda i: self._slots[i].busy_s)

    def run(self, index: int, job_id: str, model: str, request, emit, cancel, owner: str | None = None) -> None:
        """Run the job on worker `index`, passing its events to `emit`, until it ends."""
        import ray

        s = self._slots[index]
        t0 = time.monotonic()
        try:
            done = s.actor.generate.remote(job_id, model, request, owner)
            cancel_sent = ended = False
            while not ended:
                if cancel.cancelled and not cancel_sent:
                    s.actor.cancel.remote(job_id)
                    cancel_sent = True
                returned = bool(ray.wait([done], timeout=0)[0])  # then this poll gets the last events
                for item in ray.get(s.actor.poll.remote(job_id, 0.0 if returned else 0.5)):
                    event = self._land(item, job_id)
                    emit(event)
                    ended = ended or isinstance(event, TERMINAL)
                ended = ended or returned  # the queue fails a job that ended without a terminal event
            s.loaded = ray.get(done)
        except ray.exceptions.RayActorError as exc:
            reason = f"worker {s.name} ({s.gpu}, pid {s.pid}) died during the job: {_short(exc)}"
            log.error("Job %s: %s", job_id, reason)
            emit(Failed(reason + "; the sections finished so far were kept", None, self._failed_sidecar(job_id, reason)))
            self._restart(index)
        finally:
            s.busy_s += time.monotonic() - t0

    def preload(self, model: str) -> None:
        """Every worker loads `model` now; raises ValueError with the first worker's reason if one cannot."""
        import ray

        errors = [e for e in ray.get([s.actor.load.remote(model) for s in self._slots]) if e]
        for s in self._slots:
            s.loaded = (model, "")
        if errors:
            raise ValueError(errors[0])

    def pids(self) -> list[int]:
        return [s.pid for s in self._slots]

    def close(self) -> None:
        import ray

        for s in getattr(self, "_slots", []):
            try:
                ray.kill(s.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        (self.outputs / PROBE).unlink(missing_ok=True)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    # -- helpers ----------------------------------------------------------------------------------------

    def _new_actor(self, name: str):
        return self._cls.remote(name, self.make_provider, str(self.outputs), str(self.outputs / PROBE),
                                self._token, self.share)

    @staticmethod
    def _slot(actor, info: dict) -> _Slot:
        return _Slot(actor, info["name"], info["gpu"], info["host"], info["pid"], info["shared"])

    def _restart(self, index: int) -> None:
        """A new worker in the place of a dead one (models load at its first job)."""
        import ray

        old = self._slots[index]
        actor = self._new_actor(old.name)
        try:
            info = ray.get(actor.info.remote(), timeout=self.start_timeout_s)
        except Exception as exc:  # noqa: BLE001
            log.error("Job pool: worker %s could not be restarted (%s); the pool goes on without it", old.name,
                      str(exc).splitlines()[0])
            old.dead = True
            return
        self._slots[index] = replace(self._slot(actor, info), busy_s=old.busy_s)
        log.warning("Job pool: worker %s restarted on %s (pid %d)", old.name, info["gpu"], info["pid"])

    def _land(self, shipped: Shipped, job_id: str):
        """The event as the head sees it: files a worker sent are written into the output folder first."""
        event = shipped.event
        if not shipped.files:
            return event
        for name, data in shipped.files.items():
            if name.endswith(".json"):
                data = self._rebase_sidecar(data)
            path = self.outputs / name
            tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        video = getattr(event, "video_path", None)
        if video is not None and Path(video).name in shipped.files:  # the newest video holds all the older ones
            for old in self.outputs.glob(f"{job_id}_*.mp4"):
                if old.name != Path(video).name:
                    old.unlink(missing_ok=True)
        changes = {a: self.outputs / Path(getattr(event, a)).name for a in ("video_path", "sidecar_path")
                   if getattr(event, a, None) is not None and Path(getattr(event, a)).name in shipped.files}
        return replace(event, **changes)

    def _rebase_sidecar(self, data: bytes) -> bytes:
        try:
            record = json.loads(data)
        except ValueError:
            return data
        for key in ("video", "input_image"):
            if isinstance(record.get(key), str):
                record[key] = str(self.outputs / Path(record[key]).name)
        return json.dumps(record, indent=2, default=str).encode()

    def _failed_sidecar(self, job_id: str, reason: str) -> Path | None:
        """Mark the dead worker's job failed in its sidecar, pointing at its newest complete video."""
        sidecar = self.outputs / f"{job_id}.json"
        try:
            record = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return None
        videos = sorted(self.outputs.glob(f"{job_id}_*.mp4"), key=lambda p: p.stat().st_mtime)
        record.update(status="failed", error=reason, video=str(videos[-1]) if videos else None)
        try:
            write_json(record, sidecar)
        except OSError as exc:
            log.error("Could not mark job %s failed: %s", job_id, exc)
        return sidecar


def _short(exc: BaseException) -> str:
    """Ray's actor errors run over many lines; the user gets the first sentence and the exit type."""
    text = " ".join(str(exc).split())
    first = re.split(r"(?<=[a-z])\. ", text, maxsplit=1)[0].rstrip(".")[:160] or exc.__class__.__name__
    kind = re.search(r"exit type: (\w+)", text)
    return first + (f" ({kind.group(1)})" if kind else "")
