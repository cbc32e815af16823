"""How much the text tokens' keys change from one denoising step to the next (why there is no text KV cache).

    python benchmarks/text_kv_change.py [--steps 25]

Records the first dual block's text-key projection (`attn.add_k_proj`) at every step of one section of the tiny
model and prints the relative L2 change between consecutive steps. HunyuanVideo modulates the text stream by
the timestep (`norm1_context`) before that projection, so the keys are not the same at two steps; a cache that
reused them would change the output, not just save work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_helper.models.loading import load_models  # noqa: E402
from diffusers_helper.models.tiny import ensure_tiny_models, tiny_spec  # noqa: E402
from diffusers_helper.pipeline.sampling import Guidance, sample_section  # noqa: E402
from diffusers_helper.pipeline.warmup import section_inputs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    transformer = load_models(tiny_spec("tiny", ensure_tiny_models()), parts=["transformer"]).transformer
    keys = []
    transformer.transformer_blocks[0].attn.add_k_proj.register_forward_hook(
        lambda m, a, out: keys.append(out.detach().double().clone()))
    cond, noise = section_inputs(transformer, 64, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        sample_section(transformer, noise=noise, steps=args.steps, positive=cond, negative=cond, guidance=Guidance(),
                       dtype=torch.float32, device=torch.device("cpu"))
    change = [float((b - a).norm() / a.norm()) for a, b in zip(keys, keys[1:])]
    print(json.dumps({"steps": args.steps, "min": min(change), "median": sorted(change)[len(change) // 2],
                      "max": max(change)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
