"""Check the sampler and section loop against a fixture made by running the original FramePack.

    python -m diffusers_helper.parity DIR

DIR holds `cases.json`, `<case>.safetensors` and a diffusers `transformer/` folder (see the fixture's
README). Prints the relative L2 error of every expected tensor; exits 1 if any is above the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .pipeline.sampling import Guidance, draw_noise, sample_section
from .pipeline.sections import SectionSchedule

TOLERANCE = 1e-4


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    diff = torch.linalg.vector_norm(actual.double() - expected)
    return float(diff / torch.linalg.vector_norm(expected).clamp_min(1e-30))


def run_case(transformer, case: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run one case's whole section loop; returns tensors named like the fixture's `expected.*`."""
    dtype = torch.float32
    device = torch.device("cpu")
    window = case["latent_window_size"]
    start = tensors["input.start_latent"]
    schedule = SectionSchedule(case["mode"], start, case["total_latent_sections"], window)
    positive = {
        "encoder_hidden_states": tensors["input.llama_vec"].to(dtype),
        "encoder_attention_mask": tensors["input.llama_attention_mask"],
        "pooled_projections": tensors["input.clip_pooler"].to(dtype),
        "image_embeds": tensors["input.image_embeddings"].to(dtype),
    }
    negative = {
        "encoder_hidden_states": tensors["input.llama_vec_n"].to(dtype),
        "encoder_attention_mask": tensors["input.llama_attention_mask_n"],
        "pooled_projections": tensors["input.clip_pooler_n"].to(dtype),
        "image_embeds": tensors["input.image_embeddings"].to(dtype),
    }
    guidance = Guidance(cfg=case["cfg"], gs=case["gs"], rs=case["rs"])
    generator = torch.Generator("cpu").manual_seed(case["seed"])
    out: dict[str, torch.Tensor] = {}
    lat_h, lat_w = case["height"] // 8, case["width"] // 8
    for k in range(case["total_latent_sections"]):
        section = schedule.inputs(k).to_kwargs(device, dtype)
        noise = draw_noise(generator, 1, window, lat_h, lat_w)
        latents = sample_section(
            transformer, noise=noise, steps=case["steps"], positive={**positive, **section},
            negative={**negative, **section}, guidance=guidance, dtype=dtype, device=device,
        )
        out[f"expected.section_{k}"] = latents
        schedule.add(k, latents)
    out["expected.history_latents"] = schedule.video_latents
    return out


def check_dir(root: Path, log=print) -> float:
    """Returns the worst relative error over all cases."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    transformer = HunyuanVideoFramepackTransformer3DModel.from_pretrained(root / "transformer",
                                                                           torch_dtype=torch.float32)
    transformer.eval().requires_grad_(False)
    cases = json.loads((root / "cases.json").read_text())
    worst = 0.0
    with torch.inference_mode():
        for case in cases:
            tensors = load_file(str(root / f"{case['name']}.safetensors"))
            actual = run_case(transformer, case, tensors)
            for name in sorted(k for k in tensors if k.startswith("expected.")):
                if name not in actual:
                    log(f"{case['name']:<16} {name:<28} MISSING")
                    worst = float("inf")
                    continue
                if actual[name].shape != tensors[name].shape:
                    log(f"{case['name']:<16} {name:<28} shape {tuple(actual[name].shape)} != "
                        f"{tuple(tensors[name].shape)}")
                    worst = float("inf")
                    continue
                err = relative_l2(actual[name], tensors[name])
                worst = max(worst, err)
                flag = "ok" if err <= TOLERANCE else "FAIL"
                log(f"{case['name']:<16} {name:<28} rel_l2={err:.3e} {flag}")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_helper.parity", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="fixture folder (cases.json, <case>.safetensors, transformer/)")
    args = parser.parse_args(argv)
    if not (args.dir / "cases.json").is_file():
        print(f"error: {args.dir} has no cases.json", file=sys.stderr)
        return 2
    worst = check_dir(args.dir)
    print(f"worst relative L2 error: {worst:.3e} (tolerance {TOLERANCE:.0e})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
