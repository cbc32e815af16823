"""Throughput of the job pool: the same queued jobs on 1 Ray worker, then on 2 (one per GPU).

    python benchmarks/pool_throughput.py [--workers 1,2] [--jobs 4] [--seconds 5] [--steps 25] [--accel eager]
        [--out pool_throughput.json]

On GPUs, as `python -m diffusers_helper.bench --e2e` does: each worker builds the full-size FramePack models with
random weights (no download) on its own GPU, every model on the GPU, and every job is a 640x640 input (the 640
bucket). On a CPU the workers use the tiny model at 64x64 (each Ray CPU worker gets one core). Each worker first
runs a short warm-up job (model build, compile, autotuning are not timed); then `--jobs` jobs are queued at once
and the wall time from the first submit to the last end gives the throughput in jobs per minute. The speed-up is
the last worker count's throughput over the first's (the target for 2 GPUs: >= 1.9x).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("framepack.bench.pool")


class RandomWeightsProvider:
    """What each pool worker runs jobs with: the e2e benchmark's engine (full-size random weights on a GPU, the
    tiny model on a CPU), built at the first job. Pickled by value into the workers (this is a script)."""

    def __init__(self, accel: str, cache_dir: str, outputs_dir):
        self.accel, self.cache_dir, self.outputs_dir = accel, cache_dir, Path(outputs_dir)
        self._engine = None

    def get(self, model: str):
        if self._engine is None:
            import torch

            from diffusers_helper.memory.placement import Placement
            from diffusers_helper.models.fullsize import seeded_transformer
            from diffusers_helper.pipeline.e2e import _bundle, _plan
            from diffusers_helper.pipeline.engine import Engine

            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
            bundle = _bundle(device)
            bundle.transformer, _, _ = seeded_transformer(device)
            self._engine = Engine(bundle, Placement(device, "full"), outputs_dir=self.outputs_dir,
                                  plan=_plan(self.accel, self.cache_dir))
        return self._engine


def make_provider(accel: str, cache_dir: str, outputs_dir=None):
    return RandomWeightsProvider(accel, cache_dir, outputs_dir)


def _image(size: int):
    import numpy as np

    y, x = np.mgrid[0:size, 0:size]
    return np.stack([(x * 255 // size), (y * 255 // size), ((x + y) * 127 // (2 * size))], -1).astype(np.uint8)


def run(workers: int, args, size: int) -> dict:
    from functools import partial

    from diffusers_helper.app.jobs import FINISHED, JobQueue
    from diffusers_helper.parallel.pool import WorkerPool
    from diffusers_helper.pipeline.request import GenerationRequest

    out = Path(tempfile.mkdtemp(prefix=f"framepack-pool-{workers}-"))
    t0 = time.perf_counter()
    pool = WorkerPool(partial(make_provider, args.accel, args.cache_dir), out, workers, args.ray_address,
                      quiet=not args.verbose, num_cpus=None if args.ray_address else max(workers, 1))
    queue = JobQueue(None, pool=pool)
    try:
        def job(seconds, steps, n):
            return queue.submit(GenerationRequest(prompt=f"a cat walks on the grass, take {n}", image=_image(size),
                                                  seed=args.seed + n, seconds=seconds, steps=steps,
                                                  gpu_memory_preservation_gb=0), "framepack")

        warm = [job(1.0, 2, -1 - n) for n in range(pool.size)]  # one per worker: both idle, so one each
        for j in warm:
            snap = queue.wait(j)
            if snap.state != FINISHED:
                raise SystemExit(f"the warm-up job failed on {snap.worker}: {snap.error}")
        ready_s = time.perf_counter() - t0
        start = time.perf_counter()
        ids = [job(args.seconds, args.steps, n) for n in range(args.jobs)]
        snaps = [queue.wait(j) for j in ids]
        wall = time.perf_counter() - start
        failed = [s for s in snaps if s.state != FINISHED]
        if failed:
            raise SystemExit(f"{len(failed)} job(s) did not finish: {failed[0].error}")
        return {"workers": pool.size, "where": sorted({f"{s.worker} {s.gpu}" for s in snaps}),
                "startup_and_warmup_s": round(ready_s, 1), "wall_s": round(wall, 2),
                "jobs_per_min": round(60 * len(snaps) / wall, 3),
                "job_s": [round(s.ended - s.started, 2) for s in snaps], "frames": snaps[0].frames}
    finally:
        queue.close()
        pool.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts, each a run of its own")
    ap.add_argument("--jobs", type=int, default=4, help="jobs queued at once per run")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=31337)
    ap.add_argument("--accel", default="eager", help="as bench --e2e: eager, compile+fp8, compile+fp8+sage, ...")
    ap.add_argument("--ray-address", default="", help="an existing Ray cluster (default: a local Ray instance)")
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--verbose", action="store_true", help="the workers' logs on the console")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    size = 640 if gpus else 64
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    if gpus and max(counts) > gpus and not args.ray_address:
        raise SystemExit(f"{max(counts)} workers need {max(counts)} GPUs; this machine has {gpus}")
    results = {"device": torch.cuda.get_device_name() if gpus else "cpu (tiny model, one core per worker)",
               "gpus": gpus, "torch": torch.__version__, "bucket": size, "seconds": args.seconds, "steps": args.steps,
               "accel": args.accel, "jobs": args.jobs, "runs": []}
    for count in counts:
        row = run(count, args, size)
        log.info("%d worker(s): %s", count, row)
        results["runs"].append(row)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    if len(results["runs"]) > 1:
        first, last = results["runs"][0], results["runs"][-1]
        results["speedup"] = round(last["jobs_per_min"] / first["jobs_per_min"], 2)
        log.info("Throughput %d -> %d workers: %.2fx", first["workers"], last["workers"], results["speedup"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
