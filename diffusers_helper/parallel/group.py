"""The app's context-parallel ranks: with `FRAMEPACK_CP_GPUS=N` the app process is rank 0 and starts ranks 1..N-1.

Rank 0 serves the UI and writes every file; before it loads a model or runs a job it sends the command to the
other ranks (one gloo broadcast of a small pickled message), which then do the same with their own copy of the
models on their own GPU (`ranks.run_job` keeps the job in step). The other ranks are child processes: they end
with the app.
"""

from __future__ import annotations

import logging
import socket
import tempfile

import torch

from .ranks import RankEngine, follower_engine, init_ranks, run_job

log = logging.getLogger("framepack.parallel")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(message) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([message], src=0, device=torch.device("cpu"))


def _receive():
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def _follow(rank: int, world: int, port: int, make_provider, settings) -> None:
    """A rank but the first: load what rank 0 loads, run what it runs, until it says stop."""
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(message)s")
    device = init_ranks(rank, world, port=port)
    provider = make_provider(settings, device=str(device))
    with tempfile.TemporaryDirectory(prefix=f"framepack-rank{rank}-") as scratch:
        while True:
            command, payload = _receive()
            if command == "stop":
                break
            try:
                engine = provider.get(payload["model"])
                if command == "job":
                    run_job(follower_engine(engine, scratch), payload["request"], lambda event: None, None,
                            payload["job_id"])
            except Exception:  # noqa: BLE001 - rank 0 reports the job's outcome; this rank waits for the next
                log.exception("Rank %d: %s failed", rank, command)
    torch.distributed.destroy_process_group()


class RankProvider:
    """An `EngineProvider` for rank 0 whose model loads and jobs happen on every rank."""

    def __init__(self, provider, make_provider, settings, world: int):
        import torch.multiprocessing as mp

        self.provider, self.world = provider, world
        port = _free_port()
        context = mp.get_context("spawn")
        self.processes = [context.Process(target=_follow, args=(rank, world, port, make_provider, settings),
                                          daemon=True, name=f"framepack-rank{rank}") for rank in range(1, world)]
        for p in self.processes:
            p.start()
        init_ranks(0, world, port=port)
        log.info("Context parallel: %d ranks started; each job's forwards are split across %d devices", world,
                 world)

    @property
    def current(self):
        return self.provider.current

    def __getattr__(self, name):
        return getattr(self.provider, name)

    def get(self, model: str, progress=None):
        _send(("load", {"model": model}))
        return _RankZeroEngine(self.provider.get(model, progress), model)

    def close(self) -> None:
        if any(p.is_alive() for p in self.processes):
            _send(("stop", {}))
            for p in self.processes:
                p.join(timeout=30)


class _RankZeroEngine(RankEngine):
    def __init__(self, engine, model: str):
        super().__init__(engine)
        self.model = model

    def generate(self, request, emit, cancel=None, job_id=None, **kwargs):
        _send(("job", {"model": self.model, "request": request, "job_id": job_id}))
        return super().generate(request, emit, cancel, job_id, **kwargs)
