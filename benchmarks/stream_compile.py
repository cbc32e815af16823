"""First compiled forward of a streamed transformer: the block streamer with regional compile.

    python benchmarks/stream_compile.py [--device cuda]

The tiny transformer with 3 dual and 5 single blocks, every block streamed (nothing resident), then
torch.compile on the blocks: the seconds for the first two forwards (compile included) and the
relative L2 of the output against the same model run eagerly without streaming.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_helper.memory.block_stream import BlockStreamer  # noqa: E402
from diffusers_helper.accel.compile import compile_blocks  # noqa: E402
from diffusers_helper.models.tiny import build_tiny_transformer  # noqa: E402
from diffusers_helper.pipeline.warmup import forward_fn, section_inputs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    model = build_tiny_transformer(7, num_layers=3, num_single_layers=5).eval().requires_grad_(False)
    reference_model = copy.deepcopy(model).to(device)
    cond, noise = section_inputs(model, 64, torch.float32, device)
    reference = forward_fn(reference_model, cond, noise, torch.float32, device)()
    streamer = BlockStreamer(model, [model.transformer_blocks, model.single_transformer_blocks], device)
    streamer.activate(0)
    compile_blocks(model)
    t0 = time.perf_counter()
    for _ in range(2):
        out = forward_fn(model, cond, noise, torch.float32, device)()
    seconds = time.perf_counter() - t0
    err = float((out - reference).norm() / reference.norm())
    print(f"first two compiled forwards: {seconds:.1f} s; resident blocks {streamer.resident_count}; "
          f"rel. L2 vs eager {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
