"""What a LoRA costs: switching it between jobs, and the unfused layers' share of each forward.

    python benchmarks/lora_cost.py [--rank 32] [--accel compile+fp8] [--out lora_cost.json]

On a GPU the full-size FramePack transformer with random weights at the 640 bucket (the tiny model on a CPU), with a
random LoRA of the given rank on every linear layer of the transformer blocks, saved as a diffusers-format file.
Rows: the seconds per forward with no LoRA, with the LoRA, and with two LoRAs; the time `LoraManager.apply` takes
for the first load (reading and checking the file), a weight change and a switch back to none.
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
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_helper.accel.lora import LoraManager  # noqa: E402
from diffusers_helper.pipeline.e2e import _plan  # noqa: E402
from diffusers_helper.pipeline.prepare import prepare_transformer  # noqa: E402
from diffusers_helper.pipeline.warmup import forward_fn, section_inputs  # noqa: E402


def random_lora(transformer, rank: int, path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in transformer.named_modules():
        if name.startswith(("transformer_blocks", "single_transformer_blocks")) and hasattr(m, "in_features") \
                and name.split(".")[-1] not in ("linear",):  # the attention and MLP projections, not modulation
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.01
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
    return path


def timed(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--accel", default="compile+fp8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from diffusers_helper.memory.placement import Placement
    from diffusers_helper.models.fullsize import seeded_transformer
    from diffusers_helper.models.loading import ModelBundle
    from diffusers_helper.models.specs import real_spec

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transformer, dtype, size = seeded_transformer(device)
    folder = Path(tempfile.mkdtemp(prefix="lora-cost-"))
    first = random_lora(transformer, args.rank, folder / "a.safetensors", 1)
    second = random_lora(transformer, args.rank, folder / "b.safetensors", 2)
    bundle = ModelBundle(spec=real_spec("framepack"), transformer=transformer)
    prepare_transformer(bundle, _plan(args.accel, "cache"), Placement(device, "full"))
    cond, noise = section_inputs(transformer, size, dtype, device)
    run = forward_fn(transformer, cond, noise, dtype, device)
    manager = LoraManager(transformer, device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "accel": args.accel,
              "rank": args.rank, "lora_file_mb": round(first.stat().st_size / 1e6, 1)}
    with torch.inference_mode():
        result["forward_s_no_lora"] = round(timed(run, device, args.repeats), 4)
        t0 = time.perf_counter()
        manager.apply([(str(first), 1.0)])
        result["first_load_s"] = round(time.perf_counter() - t0, 3)
        result["layers"] = len(manager._wrapped)
        result["forward_s_one_lora"] = round(timed(run, device, args.repeats), 4)
        t0 = time.perf_counter()
        manager.apply([(str(first), 0.5)])
        result["weight_change_s"] = round(time.perf_counter() - t0, 3)
        manager.apply([(str(first), 1.0), (str(second), 0.5)])
        result["forward_s_two_loras"] = round(timed(run, device, args.repeats), 4)
        t0 = time.perf_counter()
        manager.apply([])
        result["unload_s"] = round(time.perf_counter() - t0, 3)
        result["forward_s_after_unload"] = round(timed(run, device, args.repeats), 4)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
