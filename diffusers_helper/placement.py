"""Where each model lives while a job runs.

Policies:
- "full": every model stays on the compute device (the original's high-VRAM mode, > 60 GB free, and
  the only sensible choice on the CPU).
- "swap": one model at a time on the GPU; the transformer and Llama, which do not fit a small GPU
  whole, are streamed block by block with diffusers group offloading (pinned memory, prefetch on a
  side stream) instead of the original's per-parameter moves.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("framepack.placement")

HIGH_VRAM_GB = 60.0
STREAMED = ("transformer", "text_encoder")


def get_cuda_free_memory_gb(device: torch.device | None = None) -> float:
    if not torch.cuda.is_available():
        return 0.0
    device = device or torch.device("cuda")
    free, _total = torch.cuda.mem_get_info(device)
    return free / 1024**3


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_streamed(model) -> bool:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(model)


@dataclass
class Placement:
    device: torch.device
    policy: str  # "full" or "swap"

    @classmethod
    def choose(cls, device: torch.device, override: str | None = None) -> "Placement":
        if override:
            log.info("Using %s placement (requested)", override)
            return cls(device, override)
        if device.type != "cuda":
            log.info("Using full placement: computing on %s", device)
            return cls(device, "full")
        free = get_cuda_free_memory_gb(device)
        policy = "full" if free > HIGH_VRAM_GB else "swap"
        log.info("Using %s placement: %.1f GB free VRAM (full needs > %.0f GB)", policy, free, HIGH_VRAM_GB)
        return cls(device, policy)

    def prepare(self, bundle) -> None:
        """One-time set-up after loading."""
        models = bundle.models()
        if self.policy == "full":
            for model in models.values():
                model.to(self.device)
            return
        for name in STREAMED:
            model = models.get(name)
            if model is None or _is_streamed(model):
                continue  # a part reused from the previous model keeps its hooks
            if hasattr(model, "enable_group_offload"):
                model.enable_group_offload(self.device, offload_type="block_level", num_blocks_per_group=1,
                                           use_stream=True)
            else:
                from diffusers.hooks import apply_group_offloading

                apply_group_offloading(model, self.device, offload_type="block_level", num_blocks_per_group=1,
                                       use_stream=True)
            log.info("Streaming %s block by block to %s", name, self.device)

    def use(self, bundle, *names: str) -> None:
        """Make the named models ready on the device; under "swap" move the others off first."""
        if self.policy == "full":
            return
        for name, model in bundle.models().items():
            if name in STREAMED:
                continue
            if name not in names:
                model.to("cpu")
        for name in names:
            if name not in STREAMED:
                bundle.models()[name].to(self.device)
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def compute_device(self) -> torch.device:
        return self.device
