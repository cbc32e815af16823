"""GPU check of the real code path: tiny and full-size models through the engine on CUDA.

    python benchmarks/gpu_smoke.py --out results.json

1. The tiny preset on CUDA, "full" and "swap" placements: same frame count as on the CPU.
2. Full-size random FramePack models (bf16 transformer, fp16 encoders and VAE) at the 640 bucket
   (640x640 input, window 9): one section with full placement, with and without TeaCache, then the
   "swap" placement (transformer and Llama streamed block by block). Seconds per step, decode time
   and peak VRAM for each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_helper.pipeline.engine import Engine  # noqa: E402
from diffusers_helper.pipeline.events import Failed, Finished, SectionFinished, Stage, StepProgress  # noqa: E402
from diffusers_helper.models.loading import load_models  # noqa: E402
from diffusers_helper.memory.placement import Placement  # noqa: E402
from diffusers_helper.pipeline.request import GenerationRequest  # noqa: E402
from diffusers_helper.models.tiny import ensure_tiny_models, tiny_spec  # noqa: E402


def image(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 127 // (h + w))], -1).astype(np.uint8)


def run(engine, request, outputs):
    """Run a job; time each step from the events."""
    step_times, stages, last = [], {}, None
    t_stage = time.perf_counter()
    current = None

    def emit(event):
        nonlocal last, t_stage, current
        now = time.perf_counter()
        if isinstance(event, StepProgress):
            if last is not None and event.step > 1:
                step_times.append(now - last)
            last = now
        elif isinstance(event, Stage):
            if current is not None:
                stages[current] = stages.get(current, 0.0) + now - t_stage
            current, t_stage, last = event.message.split(" section")[0], now, None
        elif isinstance(event, (SectionFinished, Finished, Failed)):
            if current is not None:
                stages[current] = stages.get(current, 0.0) + now - t_stage
                current = None

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    final = engine.generate(request, emit)
    torch.cuda.synchronize()
    return {
        "status": type(final).__name__, "error": getattr(final, "error", None),
        "frames": getattr(final, "frames", None), "total_s": round(time.perf_counter() - t0, 3),
        "median_step_s": round(float(np.median(step_times)), 4) if step_times else None,
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 2),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_smoke.json")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--swap-steps", type=int, default=4)
    ap.add_argument("--skip-full", action="store_true", help="skip the full-placement runs")
    ap.add_argument("--cap-gb", type=float, default=None,
                    help="emulate a card this size for the swap runs (set_per_process_memory_fraction)")
    ap.add_argument("--overlap-only", action="store_true",
                    help="only the 3-section full-placement job, decode inline vs on a side stream")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    out_dir = Path("/tmp/gpu_smoke_outputs")
    dev = torch.device("cuda")

    if args.overlap_only:
        from diffusers_helper.models.fullsize import build_bundle

        bundle = build_bundle("framepack", "cuda")
        req = dict(prompt="a woman dances", image=image(640, 640), seconds=3.6, latent_window_size=9,
                   steps=args.steps, cache="teacache")
        for mode in ("off", "on", "off", "on"):
            engine = Engine(bundle, Placement(dev, "full"), outputs_dir=out_dir, async_decode=mode)
            key = f"3_sections_teacache_async_{mode}"
            r = run(engine, GenerationRequest(**req), out_dir)
            results.setdefault(key, []).append(r)
            print(key, r, flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        return

    tiny = load_models(tiny_spec("tiny", ensure_tiny_models()))
    for policy in ("full", "swap"):
        engine = Engine(tiny, Placement(dev, policy), outputs_dir=out_dir)
        for teacache in (False, True):
            key = f"tiny_{policy}" + ("_teacache" if teacache else "")
            results[key] = run(engine, GenerationRequest(prompt="a cat", image=image(96, 128), seconds=2.4,
                                                         steps=4, cache="teacache" if teacache else "none"), out_dir)
            print(key, results[key], flush=True)
    del tiny, engine

    from diffusers_helper.models.fullsize import build_bundle

    t = time.perf_counter()
    bundle = build_bundle("framepack", "cuda")
    results["build_full_size_s"] = round(time.perf_counter() - t, 2)
    req = dict(prompt="a woman dances", image=image(640, 640), seconds=1.2, latent_window_size=9)
    if not args.skip_full:
        engine = Engine(bundle, Placement(dev, "full"), outputs_dir=out_dir)
        results["full_640"] = run(engine, GenerationRequest(**req, steps=args.steps, cache="none"), out_dir)
        print("full", results["full_640"], flush=True)
        results["full_640_teacache"] = run(engine, GenerationRequest(**req, steps=args.steps, cache="teacache"),
                                           out_dir)
        print("full+teacache", results["full_640_teacache"], flush=True)

    for model in bundle.models().values():
        model.to("cpu")
    torch.cuda.empty_cache()
    if args.cap_gb:
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * 1024**3 / torch.cuda.get_device_properties(0).total_memory)
        results["cap_gb"] = args.cap_gb
    t = time.perf_counter()
    engine = Engine(bundle, Placement(dev, "swap"), outputs_dir=out_dir)
    results["swap_setup_s"] = round(time.perf_counter() - t, 2)
    for teacache in (False, True):
        key = "swap_640" + ("_teacache" if teacache else "")
        results[key] = run(engine, GenerationRequest(**req, steps=args.swap_steps, cache="teacache" if teacache else "none"), out_dir)
        print(key, results[key], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
