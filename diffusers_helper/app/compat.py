"""Start-up compatibility checker: settings against each other and against this machine.

Every rule states something true of this implementation, with a level (critical / warning / info)
and how to fix it. On a critical finding the app pauses 5 s so the message is read (skippable).
The machine is described by `SystemInfo`, so tests can check every rule without a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from ..memory.policy import EVERYTHING_GB as FULL_PLACEMENT_GB
from ..config import TORCHAO_BITS, WEIGHT_FORMAT_NAMES, Settings, weight_format, weight_formats

log = logging.getLogger("framepack.compat")

CRITICAL, WARNING, INFO = "critical", "warning", "info"


@dataclass(frozen=True)
class SystemInfo:
    cuda: bool = False
    gpu_name: str = ""
    capability: tuple[int, int] = (0, 0)
    total_vram_gb: float = 0.0
    free_vram_gb: float = 0.0
    packages: frozenset[str] = field(default_factory=frozenset)  # optional packages importable here

    @classmethod
    def detect(cls) -> "SystemInfo":
        optional = ("xformers", "bitsandbytes", "torchao", "sageattention", "torch_tensorrt", "pynvml")
        packages = frozenset(p for p in optional if importlib.util.find_spec(p) is not None)
        try:
            import torch

            if not torch.cuda.is_available():
                return cls(packages=packages)
            free, total = torch.cuda.mem_get_info()
            return cls(cuda=True, gpu_name=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                       total_vram_gb=total / 1024**3, free_vram_gb=free / 1024**3, packages=packages)
        except Exception:  # noqa: BLE001 - a broken driver is itself a finding below
            return cls(packages=packages)


@dataclass(frozen=True)
class Finding:
    level: str
    rule: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.level}] {self.message} Fix: {self.fix}"


Rule = Callable[[Settings, SystemInfo], Finding | None]
RULES: list[tuple[str, Rule]] = []


def rule(name: str):
    def register(fn: Rule) -> Rule:
        RULES.append((name, fn))
        return fn

    return register


def _wants_cuda(s: Settings) -> bool:
    return s.device.startswith("cuda")


@rule("cuda-requested-but-missing")
def _cuda_missing(s, info):
    if _wants_cuda(s) and not info.cuda:
        return Finding(CRITICAL, "cuda-requested-but-missing", f"device {s.device!r} was asked for but PyTorch "
                       "sees no CUDA GPU.", "install the CUDA build of torch 2.13.0 and a matching driver, "
                       "or set FRAMEPACK_DEVICE=auto")


@rule("real-models-on-cpu")
def _real_on_cpu(s, info):
    if not info.cuda and not s.tiny and not s.model.startswith("tiny") and s.device in ("auto", "cpu"):
        return Finding(WARNING, "real-models-on-cpu", "no CUDA GPU: the 13B model would take hours per second of "
                       "video on the CPU.", "use a CUDA GPU, or try the app with --tiny")


@rule("keep-in-gpu-without-room")
def _keep_without_room(s, info):
    if (s.keep_models_in_gpu or s.placement == "full") and info.cuda and not s.tiny \
            and info.total_vram_gb < FULL_PLACEMENT_GB:
        return Finding(WARNING, "keep-in-gpu-without-room",
                       f"keeping every model on the GPU needs about {FULL_PLACEMENT_GB:.0f} GB; this GPU has "
                       f"{info.total_vram_gb:.1f} GB, so the first job would run out of memory.",
                       "turn off 'Keep models in GPU' (FRAMEPACK_KEEP_MODELS_IN_GPU=0) and leave placement on auto")


@rule("placement-conflict")
def _placement_conflict(s, info):
    wants_full = s.keep_models_in_gpu or s.placement == "full"
    wants_swap = s.stream_transformer or s.placement == "swap"
    if wants_full and wants_swap:
        return Finding(CRITICAL, "placement-conflict", "both 'keep models in GPU' and streamed offload "
                       "(--use-memory-v2 / placement=swap) are on; they are opposite placements.",
                       "choose one: FRAMEPACK_KEEP_MODELS_IN_GPU=1 or FRAMEPACK_USE_MEMORY_V2=1")


@rule("preservation-exceeds-vram")
def _preservation(s, info):
    if info.cuda and s.gpu_memory_preservation_gb >= info.total_vram_gb > 0:
        return Finding(WARNING, "preservation-exceeds-vram", f"GPU memory preservation is "
                       f"{s.gpu_memory_preservation_gb:g} GB but the GPU has {info.total_vram_gb:.1f} GB in all.",
                       "lower FRAMEPACK_GPU_MEMORY_PRESERVATION below the GPU's memory")


@rule("several-quantizers")
def _several_quantizers(s, info):
    chosen = weight_formats(s)
    if len(chosen) > 1:
        names = [WEIGHT_FORMAT_NAMES[f] for f in chosen]
        return Finding(CRITICAL, "several-quantizers", f"more than one quantization method is on ({', '.join(names)})"
                       f"; a weight can be stored one way only, so {names[0]} is used and the rest ignored.",
                       "keep one of FRAMEPACK_ENABLE_FP8, FRAMEPACK_ENABLE_QUANT, FRAMEPACK_USE_BNB, "
                       "FRAMEPACK_FP8_STORAGE")


@rule("slower-than-bf16")
def _slower_than_bf16(s, info):
    """Measured on an H200 at the 640 bucket (docs/performance.md): these trade speed for memory."""
    if not info.cuda:
        return None
    fmt = weight_format(s)
    if fmt == "bnb8":
        return Finding(WARNING, "slower-than-bf16", "bitsandbytes 8-bit runs a transformer forward about 1.5x slower "
                       "than bf16 (1.77 s against 1.17 s on an H200), for 9 GB less memory.",
                       "FRAMEPACK_BNB_LOAD_IN_4BIT=1 (NF4: as fast as bf16, 15 GB less), or FRAMEPACK_ENABLE_FP8=1 "
                       "with FRAMEPACK_ENABLE_COMPILE=1 (faster than bf16, 9 GB less)")
    if (fmt == "fp8" or fmt in TORCHAO_BITS) and not s.enable_compile:
        return Finding(WARNING, "slower-than-bf16", f"{WEIGHT_FORMAT_NAMES[fmt]} without torch.compile quantizes "
                       "activations in separate kernels and runs slower than bf16 (FP8 1.32 s, INT4 1.22 s against "
                       "1.17 s a forward on an H200); it still saves memory.",
                       "also set FRAMEPACK_ENABLE_COMPILE=1 (FP8 0.79-0.82 s, INT4 0.93 s a forward)")


@rule("bnb-needs-cuda")
def _bnb_needs_cuda(s, info):
    if s.use_bnb and not info.cuda:
        return Finding(CRITICAL, "bnb-needs-cuda", "bitsandbytes quantizes while loading onto a CUDA GPU, and "
                       "this machine has none.", "turn FRAMEPACK_USE_BNB off; FRAMEPACK_ENABLE_QUANT=1 (torchao) "
                       "or FRAMEPACK_FP8_STORAGE=1 also save memory")
    return None


@rule("missing-package")
def _missing_package(s, info):
    needs = [("xformers", s.xformers_mode == "aggressive", "FRAMEPACK_XFORMERS_MODE=aggressive"),
             ("bitsandbytes", s.use_bnb, "FRAMEPACK_USE_BNB=1"),
             ("torchao", s.enable_quant, "FRAMEPACK_ENABLE_QUANT=1"),
             ("torch_tensorrt", s.enable_tensorrt, "FRAMEPACK_ENABLE_TENSORRT=1")]
    missing = [(pkg, why) for pkg, on, why in needs if on and pkg not in info.packages]
    if missing:
        names = ", ".join(f"{why} needs {pkg}" for pkg, why in missing)
        return Finding(CRITICAL, "missing-package", f"{names}, which is not installed.",
                       "pip install the package (versions in requirements-optional.txt) or turn the option off")


@rule("fp8-without-hardware")
def _fp8_hw(s, info):
    if s.enable_fp8 and (not info.cuda or info.capability < (8, 9)):
        where = f"{info.gpu_name} (compute capability {info.capability[0]}.{info.capability[1]})" if info.cuda \
            else "the CPU"
        return Finding(CRITICAL, "fp8-without-hardware", f"FP8 matmuls need an Ada or Hopper GPU (compute "
                       f"capability 8.9+); this is {where}.", "set FRAMEPACK_ENABLE_FP8=0")


def _sdp_rule(s: Settings, info: SystemInfo, env) -> Finding | None:
    flash_off = str(env.get("PYTORCH_ENABLE_FLASH_SDP", "1")).strip().lower() in ("0", "false", "no", "off")
    if flash_off and s.xformers_mode != "aggressive" and info.cuda:
        return Finding(INFO, "flash-sdp-off-without-alternative", "PYTORCH_ENABLE_FLASH_SDP=0 turns off PyTorch's "
                       "flash attention kernel and xFormers is not selected; SDPA falls back to the slower kernels.",
                       "unset PYTORCH_ENABLE_FLASH_SDP unless a kernel conflict forces it")


@rule("step-cache-quality")
def _step_cache(s, info):
    if s.cache != "none":
        return Finding(INFO, "step-cache-quality", f"The {s.cache} step cache is on by default: fewer transformer "
                       "steps, at some cost to fine detail such as hands.", "pick None in the UI (or "
                       "FRAMEPACK_CACHE=none) for final renders")


def check(settings: Settings, info: SystemInfo, env=None) -> list[Finding]:
    import os

    env = os.environ if env is None else env
    findings = [f for _, fn in RULES if (f := fn(settings, info)) is not None]
    sdp = _sdp_rule(settings, info, env)
    if sdp:
        findings.append(sdp)
    order = {CRITICAL: 0, WARNING: 1, INFO: 2}
    return sorted(findings, key=lambda f: order[f.level])


def report(findings: list[Finding], wait_s: float = 5.0, skip_wait: bool = False, sleep=time.sleep) -> bool:
    """Log the findings; pause on a critical one. Returns whether there was a critical finding."""
    for f in findings:
        {CRITICAL: log.error, WARNING: log.warning, INFO: log.info}[f.level]("%s", f)
    critical = any(f.level == CRITICAL for f in findings)
    if critical and not skip_wait and wait_s > 0:
        log.error("Critical compatibility findings above; continuing in %.0f s (--no-compat-wait skips this "
                  "pause)", wait_s)
        sleep(wait_s)
    return critical
