"""VAE decode benchmark: full-size HunyuanVideo VAE (random fp16 weights), one 640x640 section.

    python benchmarks/vae_decode.py --out vae_decode.json [--frames 19] [--size 640] [--compile]

Rows: the stock decode (what the original calls; diffusers' temporal tiles), the stock decode with
spatial tiling (the original's low-VRAM path), the exact layer-wise decode with several chunk
budgets, Quality Mode (whole section in one pass) and, with --compile, the stock decode with a
torch.compile'd decoder. For each: median seconds over 3 runs after a warm-up, peak VRAM allocated
during the decode, and PSNR / max abs error against the stock decode.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_helper.models.fullsize import build_vae  # noqa: E402
from diffusers_helper.vae.chunked import decode_exact  # noqa: E402
from diffusers_helper.vae.plan import DecodeOptions, plan_decode  # noqa: E402


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = ((a.float().clamp(-1, 1) - ref.float().clamp(-1, 1)) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def measure(fn, runs: int = 3):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()  # warm-up (also cudnn.benchmark's search)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    del out
    torch.cuda.empty_cache()
    times = []
    for _ in range(runs):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() - base
        result = out
        del out
    return result, {"first_s": round(first, 3), "median_s": round(statistics.median(times), 3),
                    "peak_gb": round(peak / 1024**3, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="vae_decode.json")
    ap.add_argument("--frames", type=int, default=19)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    vae = build_vae("cuda")
    lat = args.size // 8
    z = torch.randn(1, 16, args.frames, lat, lat, device="cuda", dtype=torch.float16,
                    generator=torch.Generator("cuda").manual_seed(0))
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "frames": args.frames,
           "size": args.size, "weights_gb": round(torch.cuda.memory_allocated() / 1024**3, 2), "rows": {}}

    def row(name, fn, ref=None):
        with torch.no_grad():
            out, stats = measure(fn)
        if ref is not None:
            stats["psnr_db_vs_stock"] = round(psnr(out, ref), 2)
            stats["max_abs_err_vs_stock"] = float((out.float() - ref.float()).abs().max())
        stats["finite"] = bool(torch.isfinite(out).all())
        res["rows"][name] = stats
        print(name, stats, flush=True)
        return out

    stock = row("stock vae.decode (original, high VRAM)", lambda: vae.decode(z).sample)
    ref = stock.float().cpu()
    del stock
    vae.enable_tiling()
    row("stock + spatial tiling (original, low VRAM)", lambda: vae.decode(z).sample.float().cpu(), ref)
    vae.disable_tiling()
    plan = plan_decode(vae, args.frames, args.size, args.size, DecodeOptions(), quality=False)
    res["auto_plan"] = plan.reason
    for mb in (plan.chunk_budget_bytes // 1024**2, 256, 128):
        row(f"exact layer-wise, chunk budget {mb} MB",
            lambda mb=mb: decode_exact(vae, z, mb * 1024**2).float().cpu(), ref)
    row("Quality Mode: whole section, one pass", lambda: decode_exact(vae, z, 256 * 1024**2,
                                                                     tile_latents=args.frames).float().cpu(), ref)
    if args.compile:
        vae.decoder = torch.compile(vae.decoder, dynamic=False)
        row("stock with torch.compile'd decoder", lambda: vae.decode(z).sample.float().cpu(), ref)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
