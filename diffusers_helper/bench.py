"""Transformer speed benchmark.

    python -m diffusers_helper.bench [--configs eager,cudnn,compile,compile+cudnn] [--out bench.json]
    python -m diffusers_helper.bench --e2e ...   (whole jobs per step cache: pipeline/e2e.py)

On a GPU it builds the full-size FramePack transformer with random bf16 weights (no download) and
uses the 640x640 bucket, window 9 (about 18.6k tokens with the history); on the CPU the tiny model
at 64x64. Per configuration: seconds per forward (median), per section (25 steps) and per video
frame, peak VRAM, achieved TFLOP/s (FLOPs counted once with PyTorch's FlopCounterMode), and
fidelity against the first configuration (the eager bf16 run): the relative L2 error of one
forward's output on the same inputs, and of one section's latents with the same seed. Random weights
amplify small differences over a section's steps, so the per-forward figure is the one that isolates
what a configuration itself changes.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .pipeline.e2e import rel_l2
from .pipeline.sampling import Guidance, sample_section
from .accel.attention import set_attention_backend
from .accel.compile import compile_blocks, use_compile_cache
from .accel.weights import apply_weight_format
from .config.formats import WeightFormat
from .pipeline.warmup import forward_fn as _forward_fn
from .pipeline.warmup import section_inputs as _inputs

log = logging.getLogger("framepack.bench")

WEIGHTS = {"bf16": None, "fp32": None, "fp8": None, "int8": 8, "int4": 4, "bnb8": None, "nf4": None}  # torchao bits
BNB_BITS = {"bnb8": 8, "nf4": 4}


def _transformer(device: torch.device, weights: str = "bf16"):
    """The same weights every call (fixed seed), so each configuration starts from a fresh copy.

    bitsandbytes quantizes while loading, as in the app: the random model is saved once and loaded
    back through diffusers' from_pretrained with the app's quantization config."""
    if weights in BNB_BITS:
        return _bnb_transformer(device, BNB_BITS[weights])
    from .models.fullsize import seeded_transformer

    return seeded_transformer(device)


def _bnb_transformer(device: torch.device, bits: int):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from .accel.quant import bnb_config, check_bnb_usable

    check_bnb_usable()
    path = Path(tempfile.gettempdir()) / "framepack-bench-transformer"
    if not (path / "config.json").exists():
        model, _, _ = _transformer(device)
        model.save_pretrained(path)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(path, quantization_config=bnb_config(bits),
                                                                     torch_dtype=torch.bfloat16)
    return model.eval().requires_grad_(False), torch.bfloat16, 640


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(run) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def bench_config(name, transformer, cond, noise, dtype, device, repeats, flops, fidelity_steps, reference):
    """One configuration's row, and its (forward output, section latents) for the next rows to compare with."""
    run = _forward_fn(transformer, cond, noise, dtype, device)
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    first = time.perf_counter() - t0
    out = run().float().cpu()
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
        row["rel_l2_forward"] = rel_l2(out, reference[0])
        row["rel_l2_section"] = rel_l2(latents, reference[1])
    log.info("%s: %s", name, row)
    return row, (out, latents.float().cpu())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--e2e" in argv:  # whole jobs through the engine, per step cache and acceleration
        from .pipeline.e2e import main as e2e

        return e2e(argv)
    ap = argparse.ArgumentParser(prog="python -m diffusers_helper.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="eager,cudnn,compile,compile+cudnn",
                    help="comma-separated; each joins with '+' a weight format (bf16 by default, fp32 with TF32 "
                         "off, fp8, int8, int4, or bitsandbytes bnb8 / nf4 on CUDA), a compile (compile, or "
                         "compile-max for max-autotune without CUDA graphs) and an attention backend (cudnn, flash, "
                         "efficient, sage, ...). The first is the fidelity reference.")
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
    state = None  # (weights, compile mode) of the transformer in hand
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        parts = name.split("+")
        weights = next((p for p in parts if p in WEIGHTS), "bf16")
        mode = "max-autotune-no-cudagraphs" if "compile-max" in parts else "default" if "compile" in parts else None
        # state None: fresh bf16 weights, which convert to any format but bitsandbytes (quantized at loading);
        # a converted or compiled transformer serves only its own format and compile mode
        reusable = state in ((weights, None), (weights, mode)) or (state is None and weights not in BNB_BITS)
        if not reusable:
            del transformer  # start again from the same weights
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            transformer, dtype, size = _transformer(device, weights)
            state = None
        if (state is None or state[0] != weights) and weights not in BNB_BITS:
            apply_weight_format(transformer, WeightFormat(weights if weights in ("fp8", "int8", "int4") else "bf16"))
        # "fp32": the exact computation (no TF32), to see how far bf16 itself is from it
        run_dtype = torch.float32 if weights == "fp32" else dtype
        if weights == "fp32":
            transformer.to(run_dtype)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = weights != "fp32"
        if mode is not None and (state is None or state[1] is None):
            compile_blocks(transformer, mode)
        state = (weights, mode)
        backend = next((p for p in parts if p not in ("compile", "compile-max", "eager", *WEIGHTS)), "native")
        set_attention_backend(transformer, backend)
        run_cond = {k: v.to(run_dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        row, outputs = bench_config(name, transformer, run_cond, noise, run_dtype, device, args.repeats, flops,
                                    args.fidelity_steps, reference)
        if reference is None:
            reference = outputs
        results["configs"][name] = row
        if args.out:  # after every configuration, so a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
