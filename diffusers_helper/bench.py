"""Transformer speed benchmark.

    python -m diffusers_helper.bench [--configs eager,cudnn,compile,compile+cudnn] [--out bench.json]

On a GPU it builds the full-size FramePack transformer with random bf16 weights (no download) and
uses the 640x640 bucket, window 9 (about 18.6k tokens with the history); on the CPU the tiny model
at 64x64. Per configuration: seconds per forward (median), per section (25 steps) and per video
frame, peak VRAM, achieved TFLOP/s (FLOPs counted once with PyTorch's FlopCounterMode), and
fidelity: the relative L2 error of one section's latents against the eager run with the same seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from .sampling import Guidance, sample_section
from .sections import SectionSchedule
from .speed import compile_blocks, set_attention_backend, use_compile_cache

log = logging.getLogger("framepack.bench")


def _transformer(device: torch.device):
    if device.type == "cuda":
        from .fullsize import build_transformer

        return build_transformer(device), torch.bfloat16, 640
    from .loading import load_models
    from .tiny import ensure_tiny_models, tiny_spec

    bundle = load_models(tiny_spec("tiny", ensure_tiny_models()), parts=["transformer"])
    return bundle.transformer.to(device), torch.float32, 64


def _inputs(transformer, size: int, dtype, device, window: int = 9, text_tokens: int = 60):
    cfg = transformer.config
    g = torch.Generator("cpu").manual_seed(0)
    lat = size // 8
    start = torch.randn(1, 16, 1, lat, lat, generator=g)
    schedule = SectionSchedule("inverted", start, 3, window)
    section = schedule.inputs(0).to_kwargs(device, dtype)
    mask = torch.zeros(1, 512, dtype=torch.bool)
    mask[:, :text_tokens] = True
    image_tokens = 729 if cfg.image_proj_dim == 1152 else 9
    cond = {"encoder_hidden_states": (torch.randn(1, 512, cfg.text_embed_dim, generator=g) * mask[..., None]).to(
                device, dtype),
            "encoder_attention_mask": mask.to(device),
            "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
            "image_embeds": torch.randn(1, image_tokens, cfg.image_proj_dim, generator=g).to(device, dtype),
            **section}
    noise = torch.randn(1, 16, window, lat, lat, generator=g)
    return cond, noise


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _forward_fn(transformer, cond, noise, dtype, device):
    x = noise.to(device, dtype)
    t = torch.tensor([900.0], device=device, dtype=dtype)
    gs = torch.tensor([10000.0], device=device, dtype=dtype)

    def run():
        with torch.inference_mode():
            return transformer(hidden_states=x, timestep=t, guidance=gs, return_dict=False, **cond)[0]

    return run


def count_flops(run) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def bench_config(name, transformer, cond, noise, dtype, device, repeats, flops, fidelity_steps, reference):
    run = _forward_fn(transformer, cond, noise, dtype, device)
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    first = time.perf_counter() - t0
    run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    fwd = statistics.median(times)
    row = {"first_call_s": round(first, 3), "forward_s": round(fwd, 4), "section_s_25_steps": round(25 * fwd, 2),
           "per_video_frame_s": round(25 * fwd / 36, 3), "tflops": round(flops / fwd / 1e12, 1)}
    if device.type == "cuda":
        row["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    with torch.inference_mode():
        latents = sample_section(transformer, noise=noise, steps=fidelity_steps, positive=cond, negative=cond,
                                 guidance=Guidance(), dtype=dtype, device=device)
    if reference is not None:
        ref = reference.double()
        row["rel_l2_vs_eager"] = float(torch.linalg.vector_norm(latents.double() - ref) / torch.linalg.vector_norm(ref))
    log.info("%s: %s", name, row)
    return row, latents


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffusers_helper.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="eager,cudnn,compile,compile+cudnn",
                    help="comma-separated, bf16 before fp8 and eager before compile: eager, cudnn, flash, "
                         "compile, compile+cudnn, fp8, compile+fp8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fidelity-steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--cache-dir", default="cache")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    use_compile_cache(args.cache_dir)
    transformer, dtype, size = _transformer(device)
    cond, noise = _inputs(transformer, size, dtype, device)
    flops = count_flops(_forward_fn(transformer, cond, noise, dtype, device))
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "size": size, "flops_per_forward": flops, "configs": {}}
    reference = None
    compiled = False
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        parts = name.split("+")
        if "fp8" in parts and not getattr(transformer, "_framepack_fp8", False):
            from .fp8 import convert_to_fp8

            convert_to_fp8(transformer)
            transformer._framepack_fp8 = True
        if "fp8" not in parts and getattr(transformer, "_framepack_fp8", False):
            log.warning("%s skipped: bf16 configurations must come before FP8 ones", name)
            continue
        if "compile" in parts and not compiled:
            compile_blocks(transformer)
            compiled = True
        if "compile" not in parts and compiled:
            log.warning("%s skipped: eager configurations must come before compiled ones", name)
            continue
        backend = next((p for p in parts if p not in ("compile", "eager", "fp8")), "native")
        set_attention_backend(transformer, backend)
        row, latents = bench_config(name, transformer, cond, noise, dtype, device, args.repeats, flops,
                                    args.fidelity_steps, reference)
        if reference is None:
            reference = latents
        results["configs"][name] = row
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
