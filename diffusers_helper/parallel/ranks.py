"""The ranks of one context-parallel group: every rank runs the same job, rank 0 alone reports and writes files.

Each rank runs the engine on the same request (SPMD): the text and image encoders are cheap and deterministic, so
repeating them is simpler and no slower than sending their outputs, and every cache, LoRA and precision choice is
then taken the same way everywhere. Only the transformer's forwards are shared (`accel.context_parallel`); the
other ranks skip the VAE decode and write nothing.

What keeps the ranks in step is one gloo all-reduce at every point where the engine checks for a stop
(`RankSync`): a stop on rank 0 stops every rank at the same step, and a job that ends on one rank only (rank 0
cannot write its video: a full disk) ends it on the others at their next check instead of leaving them waiting.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from ..pipeline.request import GenerationRequest
from ..pipeline.sampling import CancelToken, JobCancelled

log = logging.getLogger("framepack.parallel")


def init_ranks(rank: int, world: int, address: str = "127.0.0.1", port: int | None = None) -> torch.device:
    """Join the process group (torchrun's variables when set); returns this rank's device. CUDA ranks use NCCL
    for tensors and gloo for the small CPU messages; CPU ranks (tests) gloo for both."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", address)
        if port is not None:
            os.environ["MASTER_PORT"] = str(port)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=rank, world_size=world)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world) when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


class RankSync(CancelToken):
    """The engine's stop flag, agreed by every rank at every check.

    Each check all-reduces (stop requested here, ranks that ended their job): any stop stops all; a rank that
    already ended makes the others end too. `end_job` is each rank's last call for a job; it repeats until every
    rank has ended, so no rank starts the next job while another is still in this one."""

    def __init__(self, local: CancelToken | None = None):
        super().__init__()
        self.local = local or CancelToken()
        self.aborted = False

    def cancel(self) -> None:
        self.local.cancel()

    def _reduce(self, stop: int, ended: int) -> tuple[int, int]:
        import torch.distributed as dist

        flags = torch.tensor([stop, ended], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        return int(flags[0]), int(flags[1])

    @property
    def cancelled(self) -> bool:
        stop, ended = self._reduce(1 if self.local.cancelled else 0, 0)
        self.aborted = self.aborted or ended > 0
        return stop > 0 or ended > 0

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise JobCancelled()

    def end_job(self) -> None:
        import torch.distributed as dist

        world = dist.get_world_size()
        while self._reduce(0, 1)[1] < world:
            pass


def rank_request(request: GenerationRequest) -> GenerationRequest:
    """Batched CFG runs both branches as one batch with a padding mask, which split attention cannot take: the
    ranks run the branches one after the other (same result)."""
    if request.batch_processing and request.cfg != 1.0:
        log.info("Context parallel: running the CFG branches one after the other (batched CFG needs a mask)")
        return replace(request, batch_processing=False)
    return request


def run_job(engine, request: GenerationRequest, emit, cancel: CancelToken | None, job_id: str | None, **kwargs):
    """One job on this rank, in step with the others; rank 0 passes its emit and cancel, the others no-ops."""
    sync = RankSync(cancel)
    try:
        return engine.generate(rank_request(request), emit, sync, job_id, **kwargs)
    finally:
        sync.end_job()
        if sync.aborted:
            log.warning("Context parallel: another rank ended job %s early", job_id)


def follower_engine(engine, scratch: str):
    """Make a rank's engine compute only: no decode, files under `scratch` (its sidecar and input copy)."""
    from pathlib import Path

    engine.computes_only = True
    engine.outputs_dir = Path(scratch)
    return engine


class RankEngine:
    """An engine whose jobs run on every rank in step: `generate` is `run_job`; everything else is the engine's."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, request, emit, cancel=None, job_id=None, **kwargs):
        return run_job(self.engine, request, emit, cancel, job_id, **kwargs)
