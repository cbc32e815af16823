"""Memory-cap benchmark: the full-size transformer (random bf16 weights) on emulated 6-24 GB cards.

    python benchmarks/memory_caps.py --caps 6,8,12,16,24 --preserve 6,3 --out memory_caps.json [--baseline]

A card of N GB is emulated with torch.cuda.set_per_process_memory_fraction, which the placement code
reads back when it decides how many transformer blocks stay resident. Rows:
- "full": every weight on the GPU, no cap (the reference);
- "swap N GB, preserve P": the "swap" placement at that cap, keeping P GB free for activations (the
  app's "GPU Inference Preserved Memory", 6 GB by default): resident blocks plus streamed ones;
- with --baseline, diffusers' block-level group offloading with stream prefetch, at the smallest cap.
For each: median seconds per transformer forward at the 640 bucket (window 9, CFG-distilled, one
forward per step), peak VRAM, the VAE decode of one section (19 latent frames) at that cap, and a
section's time: 25 forwards plus that decode. Also the pinned host-to-device bandwidth and the set-up
time (copying the weights into pinned RAM), which is the pause before the first section.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_helper.pipeline.warmup import forward_fn as _forward_fn  # noqa: E402
from diffusers_helper.pipeline.warmup import section_inputs as _inputs  # noqa: E402
from diffusers_helper.vae.decode import SectionDecoder  # noqa: E402
from diffusers_helper.models.fullsize import build_transformer, build_vae  # noqa: E402
from diffusers_helper.memory.placement import MemoryPolicy, Placement, streamer_of  # noqa: E402

GB = 1024**3
log = logging.getLogger("framepack.memory_caps")


class Parts:
    """The two models this benchmark places (what Placement needs of a ModelBundle)."""

    def __init__(self, **models):
        self._models = models
        self.transformer = models["transformer"]

    def models(self):
        return self._models


def h2d_bandwidth_gbps(device) -> float:
    src = torch.empty(GB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(GB, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(4):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return round(4 / (time.perf_counter() - t0), 1)


def time_forwards(run, repeats: int) -> tuple[float, float]:
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() / GB


def time_decode(decoder, latents) -> tuple[float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    decoder.decode(latents)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / GB


def cap_memory(device, gb: float | None) -> None:
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gb is None else gb * GB / total, device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caps", default="6,8,12,16,24")
    ap.add_argument("--preserve", default="6", help="GB kept free for activations, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-frames", type=int, default=19)
    ap.add_argument("--baseline", action="store_true", help="also time diffusers group offloading")
    ap.add_argument("--out", default="memory_caps.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = True
    caps = [float(c) for c in args.caps.split(",")]
    preserves = [float(p) for p in args.preserve.split(",")]
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "h2d_pinned_gbps": h2d_bandwidth_gbps(device), "rows": {}}
    log.info("pinned host-to-device copy: %s GB/s", results["h2d_pinned_gbps"])

    transformer, vae = build_transformer(device), build_vae(device)
    cond, noise = _inputs(transformer, 640, torch.bfloat16, device)
    run = _forward_fn(transformer, cond, noise, torch.bfloat16, device)
    latents = torch.randn(1, 16, args.decode_frames, 80, 80, device=device, dtype=torch.float16)
    decoder = SectionDecoder(vae)

    def record(name, fwd, peak, decode_s=None, decode_peak=None, **extra):
        row = {"forward_s": round(fwd, 3), "peak_vram_gb": round(peak, 2), **extra}
        if decode_s is not None:
            row.update(decode_s=round(decode_s, 2), decode_peak_gb=round(decode_peak, 2),
                       section_s=round(25 * fwd + decode_s, 1))
        if "full" in results["rows"]:
            row["vs_full"] = round(fwd / results["rows"]["full"]["forward_s"], 2)
        results["rows"][name] = row
        log.info("%s: %s", name, row)

    fwd, peak = time_forwards(run, args.repeats)
    dec, dec_peak = time_decode(decoder, latents)
    record("full", fwd, peak, dec, dec_peak)

    # the app's path: weights in RAM after loading, then the streamer copies them into pinned buffers
    transformer.to("cpu")
    vae.to("cpu")
    torch.cuda.empty_cache()
    parts = Parts(transformer=transformer, vae=vae)
    placement = Placement(device, "swap")
    t0 = time.perf_counter()
    placement.prepare(parts)
    results["setup_s"] = round(time.perf_counter() - t0, 1)
    streamer = streamer_of(transformer)
    results["pinned"] = streamer.pinned
    for cap in caps:
        for preserve in preserves:
            cap_memory(device, cap)
            placement.memory = MemoryPolicy(preserve_gb=preserve)
            try:
                placement.use(parts, "transformer")
                fwd, peak = time_forwards(run, args.repeats)
                resident = streamer.resident_count
                streamed = (streamer.total_bytes - streamer.resident_bytes) / GB
                placement.use(parts, "vae")
                dec, dec_peak = time_decode(decoder, latents)
            except torch.cuda.OutOfMemoryError as exc:
                results["rows"][f"swap {cap:g} GB, preserve {preserve:g}"] = {"error": str(exc).splitlines()[0]}
                log.warning("%s GB / preserve %s: out of memory", cap, preserve)
                continue
            record(f"swap {cap:g} GB, preserve {preserve:g}", fwd, peak, dec, dec_peak, resident_blocks=resident,
                   streamed_gb_per_forward=round(streamed, 1))
    cap_memory(device, None)

    if args.baseline:
        from diffusers.hooks import apply_group_offloading

        placement.use(parts, "transformer")
        streamer.close()
        transformer.to("cpu")
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        apply_group_offloading(transformer, device, offload_type="block_level", num_blocks_per_group=1,
                               use_stream=True)
        setup = time.perf_counter() - t0
        cap_memory(device, min(caps))
        fwd, peak = time_forwards(run, args.repeats)
        record(f"diffusers group offload {min(caps):g} GB", fwd, peak, setup_s=round(setup, 1))
        cap_memory(device, None)

    text = json.dumps(results, indent=2)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
