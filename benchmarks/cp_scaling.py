"""Context-parallel scaling: seconds per transformer forward on 1 and on N GPUs, and the split forward's error.

    torchrun --nproc-per-node N benchmarks/cp_scaling.py [--accel eager|compile|compile+fp8] [--size 640]
             [--attention ulysses|ring] [--steps 25] [--out cp.json]

Every rank builds the full-size FramePack transformer with random weights (the tiny model on CPU ranks, gloo),
times the whole forward alone (the one-GPU figure: each rank runs it on its own GPU, rank 0's is reported), then
joins the split and times it again. The section figure is `steps` forwards (no step cache). The relative error
is the split output against the whole one on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_helper.accel.context_parallel import ContextParallel  # noqa: E402
from diffusers_helper.models.fullsize import seeded_transformer  # noqa: E402
from diffusers_helper.models.loading import ModelBundle  # noqa: E402
from diffusers_helper.models.specs import real_spec  # noqa: E402
from diffusers_helper.memory.placement import Placement  # noqa: E402
from diffusers_helper.parallel.ranks import init_ranks, torchrun_rank  # noqa: E402
from diffusers_helper.pipeline.e2e import _plan  # noqa: E402
from diffusers_helper.pipeline.prepare import prepare_transformer  # noqa: E402
from diffusers_helper.pipeline.warmup import forward_fn, section_inputs  # noqa: E402


def timed(run, device, repeats: int) -> tuple[float, torch.Tensor]:
    out = run()
    run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accel", default="compile")
    ap.add_argument("--attention", default="ulysses", choices=("ulysses", "ring"))
    ap.add_argument("--size", type=int, default=None, help="bucket side in pixels (GPU default 640)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--heads", type=int, default=0, help="CPU only: the tiny model with this many heads (random "
                    "weights), for runs with more ranks than its 2 heads")
    ap.add_argument("--kernel-noise", action="store_true", help="also report how far the flash kernel's whole "
                    "forward is from the default one: the bf16 noise the split's error compares with")
    ap.add_argument("--share-gpu", action="store_true", help="every rank on GPU 0 over gloo: checks the split's "
                    "error on a one-GPU machine (its timings mean nothing)")
    args = ap.parse_args()
    rank, world = torchrun_rank() or (0, 1)
    if args.share_gpu:
        torch.cuda.set_device(0)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    device = init_ranks(rank, world)
    transformer, dtype, size = seeded_transformer(device)
    if args.heads and device.type == "cpu":  # the tiny model has 2 heads: more ranks need more (random weights)
        torch.manual_seed(0)
        transformer = type(transformer).from_config({**transformer.config, "num_attention_heads": args.heads})
    size = args.size or size
    bundle = ModelBundle(spec=real_spec("framepack"), transformer=transformer)
    plan = _plan(args.accel, "cache")
    placement = Placement(device, "full")
    prepare_transformer(bundle, plan, placement)
    cond, noise = section_inputs(transformer, size, dtype, device)
    whole_s, whole = timed(forward_fn(transformer, cond, noise, dtype, device), device, args.repeats)
    whole = whole.float().clone()
    noise_ref = None
    if args.kernel_noise and device.type == "cuda":  # what bf16 rounding alone moves: the same forward, another kernel
        transformer.set_attention_backend("_native_flash")
        noise_ref = forward_fn(transformer, cond, noise, dtype, device)().float()
        transformer.set_attention_backend("native")
    row = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "ranks": world,
           "shared_gpu": args.share_gpu, "heads": transformer.config.num_attention_heads,
           "accel": args.accel, "attention": args.attention, "size": size, "forward_s_1": round(whole_s, 4)}
    if noise_ref is not None:
        row["kernel_noise_rel"] = float((noise_ref - whole).norm() / whole.norm())
    if world > 1:
        from dataclasses import replace

        prepare_transformer(bundle, replace(plan, context_parallel=ContextParallel(world, args.attention)), placement)
        split_s, split = timed(forward_fn(transformer, cond, noise, dtype, device), device, args.repeats)
        err = float((split.float() - whole).norm() / whole.norm())
        row.update(forward_s_n=round(split_s, 4), speedup=round(whole_s / split_s, 3),
                   efficiency=round(whole_s / split_s / world, 3), rel_err=err)
    row["section_s_1"] = round(row["forward_s_1"] * args.steps, 2)
    if "forward_s_n" in row:
        row["section_s_n"] = round(row["forward_s_n"] * args.steps, 2)
    if rank == 0:
        print(json.dumps(row, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(row, indent=2))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
