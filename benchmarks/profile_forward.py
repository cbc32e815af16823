"""Where a transformer forward's GPU time goes: matmuls, attention, fused elementwise kernels, the rest.

    python benchmarks/profile_forward.py [--configs compile,compile+fp8] [--out profile.json]

Full-size transformer with random bf16 weights at the 640 bucket, window 9 (as the bench). For each
configuration: two warm-up forwards, then one forward under torch.profiler; kernel times are summed
by category and the largest kernels listed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_helper.models.fullsize import build_transformer  # noqa: E402
from diffusers_helper.accel.compile import compile_blocks, use_compile_cache  # noqa: E402
from diffusers_helper.accel.weights import apply_weight_format  # noqa: E402
from diffusers_helper.config.formats import WeightFormat  # noqa: E402
from diffusers_helper.pipeline.warmup import forward_fn, section_inputs  # noqa: E402

CATEGORIES = [("attention", ("fmha", "flash", "attention", "sdpa", "cudnn_generated")),
              ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "scaled_mm", "matmul", "sm90_")),
              ("fused (Triton)", ("triton",)),
              ("copy", ("copy", "memcpy", "cat", "elementwise_kernel_with_index"))]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile(run) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    per_kernel = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name][0] += evt.device_time / 1e6
            per_kernel[evt.name][1] += 1
    cats = defaultdict(float)
    for name, (seconds, _) in per_kernel.items():
        cats[category(name)] += seconds
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]
    return {"wall_s_profiled": round(wall, 4), "gpu_s": round(sum(cats.values()), 4),
            "categories_s": {k: round(v, 4) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:140], "s": round(s, 4), "calls": c} for n, (s, c) in top]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="eager,compile,compile+fp8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache-dir", default="cache")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    use_compile_cache(args.cache_dir)
    device = torch.device("cuda")
    results = {}
    for name in args.configs.split(","):
        parts = name.split("+")
        torch.manual_seed(0)
        model = build_transformer(device)
        apply_weight_format(model, WeightFormat("fp8" if "fp8" in parts else "bf16"))
        if "compile" in parts or "compile-max" in parts:
            compile_blocks(model, "max-autotune-no-cudagraphs" if "compile-max" in parts else "default")
        cond, noise = section_inputs(model, 640, torch.bfloat16, device)
        run = forward_fn(model, cond, noise, torch.bfloat16, device)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        row = {"forward_s": round((time.perf_counter() - t0) / 3, 4), **profile(run)}
        results[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
        del model, run
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
