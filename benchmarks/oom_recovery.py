"""Out-of-memory recovery on a real GPU: does a job that runs out of memory step down and finish, and how long
does recovering take?

    python benchmarks/oom_recovery.py --headroom 1.2,0.5 --steps 4 --out oom.json

Full-size random-weight models are placed on the GPU whole ("full" placement), then the process's memory is
capped (`torch.cuda.set_per_process_memory_fraction`) at what the weights take plus `headroom` GB, which
emulates a card just too small for the job. A one-section job then runs; the result row says how it ended,
which step-downs happened (from the sidecar) and how long the job took against the same job uncapped.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_helper.memory.placement import Placement, release_streamer  # noqa: E402
from diffusers_helper.pipeline.engine import Engine  # noqa: E402
from diffusers_helper.pipeline.request import GenerationRequest  # noqa: E402


def _image(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)


def run(engine: Engine, steps: int, out: Path) -> dict:
    request = GenerationRequest(prompt="a woman dances", image=_image(640), seconds=1.2, steps=steps,
                                cache="none", gpu_memory_preservation_gb=0)
    stages = []
    t0 = time.perf_counter()
    final = engine.generate(request, lambda e: stages.append((round(time.perf_counter() - t0, 2),
                                                               getattr(e, "message", type(e).__name__))))
    total = time.perf_counter() - t0
    record = json.loads(Path(final.sidecar_path).read_text()) if getattr(final, "sidecar_path", None) else {}
    return {"result": type(final).__name__, "error": getattr(final, "error", None), "total_s": round(total, 2),
            "frames": getattr(final, "frames", None), "oom_recoveries": record.get("oom_recoveries", []),
            "policy_after": engine.placement.policy,
            "stages": [s for s in stages if "Out of" in str(s[1]) or "section" in str(s[1]).lower()][:12]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--headroom", default="1.2,0.5", help="comma-separated GB left above the placed weights")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="oom_recovery.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from diffusers_helper.models.fullsize import build_bundle

    dev = torch.device("cuda")
    out = Path("/tmp/oom_outputs")
    total = torch.cuda.get_device_properties(0).total_memory
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps, "runs": {}}
    cases = [("uncapped", None)] + [(f"headroom_{float(h):g}_gb", float(h)) for h in args.headroom.split(",")
                                      if h.strip()]
    for key, headroom in cases:
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()
        engine = Engine(build_bundle("framepack", "cuda"), Placement(dev, "full"), outputs_dir=out)  # fresh models
        weights = torch.cuda.memory_allocated()
        if headroom is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, (weights + headroom * 1024**3) / total))
        results["runs"][key] = {"weights_gb": round(weights / 1024**3, 2), **run(engine, args.steps, out)}
        print(key, results["runs"][key], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        release_streamer(engine.bundle.transformer)  # a step-down pinned its blocks: unpin before dropping it
        del engine
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
