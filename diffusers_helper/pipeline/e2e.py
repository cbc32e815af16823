"""End-to-end benchmark: whole jobs through the engine (encode, every section, decode, MP4), per step cache and
acceleration. The code behind `python -m diffusers_helper.bench --e2e`.

    python -m diffusers_helper.bench --e2e [--accel eager,compile+fp8,compile+fp8+sage]
        [--caches none,teacache,magcache,fbcache,taylorseer] [--seconds 5] [--steps 25] [--out e2e.json]

On a GPU: the full-size FramePack models with random weights (no download), every model on the GPU, a 640x640
input (the 640 bucket); on the CPU the tiny model at 64x64. Per row: seconds per output frame (the job's wall
time, compile excluded by a short warm-up job per acceleration), steps computed / skipped, peak VRAM, and the
deviation of the job's final latents (every section's, concatenated) from the no-cache job of the same
acceleration, and from the first acceleration's no-cache job. Random weights make the deviations pessimistic:
a trained model's steps change more smoothly than a random one's; they are not a quality measure.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("framepack.bench")


def _image(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([(x * 255 // size), (y * 255 // size), ((x + y) * 127 // (2 * size))], -1).astype(np.uint8)


def _bundle(device: torch.device):
    """Every model but the transformer, which each acceleration gets afresh from `seeded_transformer`."""
    others = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "feature_extractor",
              "image_encoder"]
    if device.type == "cuda":
        from ..models.fullsize import build_bundle

        return build_bundle("framepack", device, parts=tuple(others))
    from ..models.loading import load_models
    from ..models.tiny import ensure_tiny_models, tiny_spec

    return load_models(tiny_spec("tiny", ensure_tiny_models()), parts=others)


def _plan(accel: str, cache_dir: str):
    from ..accel.attention import AttentionConfig
    from ..accel.compile import CompileConfig
    from ..config.formats import WeightFormat
    from .prepare import TransformerPlan

    parts = set(accel.split("+"))
    unknown = parts - {"eager", "compile", "fp8", "sage", "cudnn", "flash", "fa3"}
    if unknown:
        raise SystemExit(f"unknown acceleration part(s) {', '.join(sorted(unknown))} in {accel!r}")
    backend = next((p for p in ("sage", "cudnn", "flash", "fa3") if p in parts), "auto")
    return TransformerPlan(weights=WeightFormat("fp8" if "fp8" in parts else "bf16"),
                           compile=CompileConfig(enabled="compile" in parts, cache_dir=cache_dir),
                           attention=AttentionConfig(backend=backend), cache_store=None)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 distance, in float64 on the CPU."""
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def run_job(engine, request) -> tuple[dict, torch.Tensor]:
    """One job; its row and its final latents (what each section handed to the decoder, concatenated)."""
    latents = []
    decode = engine.decoder.decode

    def recording(z, *args, **kwargs):
        latents.append(z.detach().float().cpu())
        return decode(z, *args, **kwargs)

    engine.decoder.decode = recording
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        final = engine.generate(request, lambda e: None)
    finally:
        engine.decoder.decode = decode
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if type(final).__name__ != "Finished":
        raise RuntimeError(f"the job did not finish: {final}")
    record = json.loads(Path(final.sidecar_path).read_text())
    totals = record.get("step_cache", {}).get("sections", [])
    row = {"total_s": round(wall, 2), "frames": final.frames, "s_per_frame": round(wall / final.frames, 4),
           "steps_computed": sum(s["computed"] for s in totals) if totals else request.steps * record["sections"],
           "steps_skipped": sum(s["skipped"] for s in totals) if totals else 0,
           "cache": record.get("step_cache", {}).get("description", "off"),
           "decode_busy_s": record.get("decode_busy_s")}  # VAE decode + MP4 writes, partly overlapping sampling
    if cuda:
        row["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    return row, torch.cat([z.flatten() for z in latents])


def main(argv=None) -> int:
    from ..memory.placement import Placement
    from .engine import Engine
    from .request import GenerationRequest

    ap = argparse.ArgumentParser(prog="python -m diffusers_helper.bench --e2e", description=__doc__.splitlines()[0])
    ap.add_argument("--e2e", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--accel", default="eager,compile+fp8", help="comma-separated; each joins with '+' compile, "
                    "fp8 and an attention backend (sage, cudnn, flash, fa3); eager is none of them")
    ap.add_argument("--caches", default="none,teacache,magcache,fbcache,taylorseer",
                    help="comma-separated cache names, each optionally with its knobs: "
                         "magcache:magcache_threshold=0.25:magcache_max_skips=4")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=31337)
    ap.add_argument("--out", default=None, help="write the results as JSON (after every row)")
    ap.add_argument("--cache-dir", default="cache")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    if "none" in caches:  # the reference of every row comes first
        caches = ["none"] + [c for c in caches if c != "none"]
    else:
        log.warning("No 'none' row: deviations are measured against the no-cache job only when it runs")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "seconds": args.seconds, "steps": args.steps, "rows": {}}
    first_reference = None
    outputs = Path(tempfile.mkdtemp(prefix="framepack-e2e-"))
    from ..models.fullsize import seeded_transformer

    bundle = _bundle(device)
    engine = None
    for accel in [a.strip() for a in args.accel.split(",") if a.strip()]:
        del engine  # the previous acceleration's converted or compiled transformer goes before the next is built
        bundle.transformer = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bundle.transformer, _, size = seeded_transformer(device)  # the same weights for every acceleration
        image = _image(size)
        engine = Engine(bundle, Placement(device, "full"), outputs_dir=outputs, plan=_plan(accel, args.cache_dir))
        request = dict(prompt="a cat walks on the grass", image=image, seed=args.seed, gpu_memory_preservation_gb=0)
        t0 = time.perf_counter()  # compile (and cuDNN autotuning) happen here, not in the timed jobs
        run_job(engine, GenerationRequest(**request, seconds=1.0, steps=2, cache="none"))
        results.setdefault("warmup_s", {})[accel] = round(time.perf_counter() - t0, 1)
        reference = None
        for spec in caches:
            cache, *knobs = spec.split(":")
            values = {k: float(v) for k, v in (knob.split("=", 1) for knob in knobs)}
            row, latents = run_job(engine, GenerationRequest(**request, seconds=args.seconds, steps=args.steps,
                                                             cache=cache, **values))
            if reference is not None:
                row["rel_l2_vs_no_cache"] = round(rel_l2(latents, reference), 5)
            elif cache == "none":
                reference = latents
            if first_reference is not None:
                row["rel_l2_vs_first_no_cache"] = round(rel_l2(latents, first_reference), 5)
            log.info("%s + %s: %s", accel, spec, row)
            results["rows"][f"{accel}+{spec}"] = row
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2))
        if first_reference is None:
            first_reference = reference
    print(json.dumps(results, indent=2))
    return 0

