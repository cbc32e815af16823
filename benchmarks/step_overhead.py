"""What a step costs when a step cache skips it: everything outside the transformer blocks.

    python benchmarks/step_overhead.py [--accel compile+fp8] [--out step_overhead.json] [--profile]

Runs one section (25 steps) through the engine twice on the full-size random-weight models at 640 (the tiny model
on a CPU): every step computed, then only step 0 computed and the 24 others skipped (the residual cache forced to
skip). The engine's step events give each step's wall time; the median skipped step is what a step cache cannot
save. With --profile, one forced-skip section runs under torch.profiler and the top operators by CPU and by GPU
time are printed, to say where that time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_helper.caches.teacache import TeaCache  # noqa: E402
from diffusers_helper.memory.placement import Placement  # noqa: E402
from diffusers_helper.pipeline.e2e import _bundle, _image, _plan  # noqa: E402
from diffusers_helper.pipeline.engine import Engine  # noqa: E402
from diffusers_helper.pipeline.events import StepProgress  # noqa: E402
from diffusers_helper.pipeline.request import GenerationRequest  # noqa: E402


def step_times(engine, request) -> list[float]:
    events = []
    engine.generate(request, events.append)
    marks = [e.elapsed_s for e in events if isinstance(e, StepProgress)]
    return [b - a for a, b in zip(marks, marks[1:])]  # step k's time, for k >= 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accel", default="compile+fp8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from diffusers_helper.models.fullsize import seeded_transformer

    bundle = _bundle(device)
    bundle.transformer, _, size = seeded_transformer(device)
    engine = Engine(bundle, Placement(device, "full"), outputs_dir=tempfile.mkdtemp(),
                    plan=_plan(args.accel, "cache"))
    base = dict(prompt="a cat walks on the grass", image=_image(size), seed=1, gpu_memory_preservation_gb=0,
                seconds=1.0)
    engine.generate(GenerationRequest(**base, steps=2, cache="none"), lambda e: None)  # compile, autotune

    computed = step_times(engine, GenerationRequest(**base, steps=25, cache="none"))
    original = TeaCache.decide
    TeaCache.decide = lambda self, state, step, *a: step == 0  # every later step skips
    try:
        skipped = step_times(engine, GenerationRequest(**base, steps=25, cache="teacache"))
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                engine.generate(GenerationRequest(**base, steps=25, cache="teacache"), lambda e: None)
            avg = prof.key_averages()
            print(avg.table(sort_by="self_cpu_time_total", row_limit=30))
            if device.type == "cuda":
                print(avg.table(sort_by="self_cuda_time_total", row_limit=30))
    finally:
        TeaCache.decide = original

    from diffusers_helper.media.preview import latent_preview

    z = torch.randn(1, 16, 9, size // 8, size // 8, device=device)
    latent_preview(z)
    t0 = time.perf_counter()
    for _ in range(10):
        latent_preview(z)
    preview_s = (time.perf_counter() - t0) / 10
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "accel": args.accel,
              "computed_step_s": round(statistics.median(computed), 4),
              "skipped_step_s": round(statistics.median(skipped[1:]), 4), "preview_s": round(preview_s, 4),
              "computed_steps": [round(t, 4) for t in computed], "skipped_steps": [round(t, 4) for t in skipped]}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
