"""One worker of the job pool: a Ray actor with its own engine on its own GPU, running one job at a time.

`pool.py` wraps `PoolWorker` with `ray.remote` when the pool starts, so this module never imports Ray. The head
calls `generate` (which blocks for the whole job), long-polls `poll` for the job's events and calls `cancel`; the
actor runs with `max_concurrency` > 1 so those calls are served while a job runs.

Files: when the head's output folder is visible here (a probe file the head wrote reads back the same), the engine
writes into it directly; otherwise into a local folder, and every event that names a file carries that file's bytes
to the head (`Shipped.files`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..media.video import write_json
from ..pipeline.events import TERMINAL, Failed, SectionFinished, StepProgress
from ..pipeline.sampling import CancelToken

log = logging.getLogger("framepack.pool.worker")

PROBE = ".pool-probe"


@dataclass
class Shipped:
    """An event for the head, with the bytes of the files it names when the output folder is not shared."""

    event: object
    files: dict[str, bytes] = field(default_factory=dict)


def lora_key(request) -> str:
    """The LoRA set a request asks for, normalised: the part of a worker's state beyond its model."""
    return ",".join(sorted(t.strip() for t in (request.loras or "").split(",") if t.strip()))


def gpu_label() -> str:
    """The GPU Ray gave this process ('GPU 1', its id on the node), or 'CPU'."""
    try:
        import ray

        ids = ray.get_gpu_ids()
    except Exception:  # noqa: BLE001 - outside Ray (tests of this class alone)
        ids = []
    return "GPU " + ",".join(str(i) for i in ids) if ids else "CPU"


def reads_same(probe: str | None, token: str | None) -> bool:
    try:
        return bool(probe) and Path(probe).read_text() == token
    except OSError:
        return False


class PoolWorker:
    def __init__(self, name: str, make_provider, head_outputs: str, probe: str | None = None,
                 token: str | None = None, share: str = "auto"):
        self.name, self.gpu, self.host = name, gpu_label(), socket.gethostname()
        self.shared = share == "shared" or (share == "auto" and reads_same(probe, token))  # else "copy"
        outputs = head_outputs if self.shared else tempfile.mkdtemp(prefix=f"framepack-{name}-")
        self.provider = make_provider(outputs_dir=outputs)
        self.loaded: tuple[str | None, str] = (None, "")  # (model, LoRA set) of the last job
        self._cond = threading.Condition()
        self._events: list[Shipped] = []
        self._job: str | None = None
        self._cancel = CancelToken()
        self._cancelled: set[str] = set()  # cancels that arrived before their job started here
        log.info("Pool worker %s on %s (%s), pid %d; output folder %s", name, self.gpu, self.host, os.getpid(),
                 "shared with the head" if self.shared else f"local ({outputs}), files sent to the head")

    def info(self) -> dict:
        return {"name": self.name, "gpu": self.gpu, "host": self.host, "pid": os.getpid(), "shared": self.shared,
                "loaded": self.loaded}

    def load(self, model: str) -> str | None:
        """Load `model` before the first job; returns the reason in one line if it cannot be loaded."""
        try:
            self.provider.get(model)
            self.loaded = (model, "")
            return None
        except Exception as exc:  # noqa: BLE001 - the head prints one line
            log.exception("Loading %s failed", model)
            return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__

    def generate(self, job_id: str, model: str, request, owner: str | None = None) -> tuple[str | None, str]:
        """Run one job to its end; its events wait for `poll`. Returns what is loaded afterwards."""
        with self._cond:
            self._job, self._events, self._cancel = job_id, [], CancelToken()
            if job_id in self._cancelled:
                self._cancel.cancel()
        stamped = []

        def emit(event) -> None:
            sidecar = getattr(event, "sidecar_path", None) or Path(self.provider.outputs_dir) / f"{job_id}.json"
            if not stamped or isinstance(event, TERMINAL):  # the engine wrote the sidecar before both
                stamped.append(self._stamp(Path(sidecar)))
            self._push(Shipped(event, self._files(event, job_id)))

        try:
            try:
                engine = self.provider.get(model)
            except Exception as exc:  # noqa: BLE001 - as the in-process worker: one line, the trace in the log
                log.exception("Loading %s failed", model)
                self._push(Shipped(Failed(str(exc).splitlines()[0], None, None)))
                return self.loaded
            self.loaded = (model, lora_key(request))
            owner_kw = {"owner": owner} if owner else {}
            engine.generate(request, emit, self._cancel, job_id=job_id, **owner_kw)
        except Exception as exc:  # noqa: BLE001 - the job fails, the worker stays
            log.exception("Job %s failed outside the engine's own handling", job_id)
            self._push(Shipped(Failed(f"{exc.__class__.__name__}: {exc}".splitlines()[0], None, None)))
        finally:
            with self._cond:
                self._cancelled.discard(job_id)
        return self.loaded

    def poll(self, job_id: str, timeout: float = 0.5) -> list[Shipped]:
        """The job's events since the last poll, waiting up to `timeout` for one; progress is coalesced (only the
        newest step matters to a viewer)."""
        with self._cond:
            self._cond.wait_for(lambda: self._job == job_id and self._events, timeout)
            if self._job != job_id:
                return []
            events, self._events = self._events, []
        steps = [i for i, s in enumerate(events) if isinstance(s.event, StepProgress)]
        return [s for i, s in enumerate(events) if not isinstance(s.event, StepProgress) or i == steps[-1]]

    def cancel(self, job_id: str) -> bool:
        with self._cond:
            if self._job == job_id:
                self._cancel.cancel()
            else:
                self._cancelled.add(job_id)
            return True

    def pid(self) -> int:
        return os.getpid()

    # -- helpers ------------------------------------------------------------------------------------------

    def _push(self, shipped: Shipped) -> None:
        with self._cond:
            self._events.append(shipped)
            self._cond.notify_all()

    def _stamp(self, sidecar: Path) -> bool:
        """Record this worker and its GPU in the job's sidecar (the engine's record knows neither)."""
        try:
            record = json.loads(sidecar.read_text())
            record.update(worker=self.name, gpu=self.gpu, host=self.host)
            write_json(record, sidecar)
            return True
        except (OSError, ValueError):
            return False

    def _files(self, event, job_id: str) -> dict[str, bytes]:
        if self.shared:
            return {}
        paths = [getattr(event, "video_path", None)]
        if isinstance(event, TERMINAL) or isinstance(event, SectionFinished):
            outputs = Path(self.provider.outputs_dir)
            paths += [getattr(event, "sidecar_path", None) or outputs / f"{job_id}.json"]
            if isinstance(event, TERMINAL):
                paths += sorted(outputs.glob(f"{job_id}*.png"))
        out = {}
        for path in paths:
            if path is not None and Path(path).is_file():
                out[Path(path).name] = Path(path).read_bytes()
                if isinstance(event, TERMINAL):  # the head has them now; this disk is no archive
                    Path(path).unlink(missing_ok=True)
        return out
