"""What memory there is (free VRAM within any per-process cap, free RAM) and the placement policy that
follows from it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("framepack.memory")

GB = 1024**3
EVERYTHING_GB = 60.0  # every model on one GPU: transformer 26 GB + Llama 16 GB + activations (the original's
# high-VRAM threshold)


def cuda_free_bytes(device: torch.device | None = None) -> int:
    """What this process can still allocate: the device's free memory plus the allocator's unused cache,
    within `torch.cuda.set_per_process_memory_fraction` when one is set (how benchmarks emulate a
    smaller card)."""
    device = torch.device(device or "cuda")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # PyTorch >= 2.9
    fraction = get_fraction(device) if get_fraction else 1.0
    if fraction < 1.0:
        free = min(free, int(fraction * total) - allocated)
    return max(0, free)


def get_cuda_free_memory_gb(device: torch.device | None = None) -> float:
    if not torch.cuda.is_available():
        return 0.0
    return cuda_free_bytes(device) / GB


def get_free_ram_gb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().available / GB
    except ImportError:  # pragma: no cover - psutil ships with gradio
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) / GB


@dataclass(frozen=True)
class PolicyChoice:
    policy: str  # "full", "swap" (streamed, pinned RAM) or "swap-lowram" (streamed, unpinned)
    reason: str


def choose_policy(free_vram_gb: float, free_ram_gb: float, transformer_gb: float = 26.0,
                  everything_gb: float = EVERYTHING_GB, override: str | None = None) -> PolicyChoice:
    """Everything on the GPU when it fits; else stream the transformer from pinned RAM (fast
    transfers) when RAM holds it with room to spare; else stream from pageable RAM (no pinned copy)."""
    if override:
        return PolicyChoice(override, "requested")
    if free_vram_gb > everything_gb:
        return PolicyChoice("full", f"{free_vram_gb:.1f} GB free VRAM holds every model ({everything_gb:.0f} GB)")
    if free_ram_gb > 1.5 * transformer_gb:
        return PolicyChoice("swap", f"streamed offload: {free_vram_gb:.1f} GB free VRAM, {transformer_gb:.0f} GB "
                                    f"transformer pinned in {free_ram_gb:.0f} GB free RAM")
    return PolicyChoice("swap-lowram", f"streamed offload without pinning: only {free_ram_gb:.0f} GB free RAM for "
                                       f"a {transformer_gb:.0f} GB transformer")
