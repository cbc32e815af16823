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
from dataclasses import dataclass, field
from typing import Callable

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


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _on_device(model, device: torch.device) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == device.type


@dataclass
class MemoryPolicy:
    """Per-job knobs of the swap policy (the UI's memory controls)."""

    keep_loaded: bool = False  # "Keep models in GPU": never move a model back to the CPU
    offload_threshold_gb: float = 0.0  # "CPU offload threshold": offload only above this much in use
    preserve_gb: float = 6.0  # "GPU memory preservation": keep at least this much free


@dataclass
class Placement:
    device: torch.device
    policy: str  # "full" or "swap"
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    # (free, used) bytes on the device; replaceable so the decisions can be tested without a GPU
    probe: Callable[[], tuple[int, int]] | None = None

    def _free_used(self) -> tuple[int, int]:
        if self.probe is not None:
            return self.probe()
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free, torch.cuda.memory_allocated(self.device)
        return 1 << 62, 0

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

    def use(self, bundle, *names: str) -> list[str]:
        """Make the named models ready on the device. Under "swap", other models go back to the CPU
        when the memory policy asks for room; returns the names moved off, for the log and tests."""
        if self.policy == "full":
            return []
        models = bundle.models()
        wanted = [n for n in names if n in models and n not in STREAMED]
        needed = sum(model_bytes(models[n]) for n in wanted if not _on_device(models[n], self.device))
        gb = 1024**3
        offloaded = []
        if not self.memory.keep_loaded:
            for name, model in models.items():
                if name in STREAMED or name in names or not _on_device(model, self.device):
                    continue
                free, used = self._free_used()
                over_threshold = used + needed > self.memory.offload_threshold_gb * gb
                short = free - needed < self.memory.preserve_gb * gb
                if over_threshold or short:
                    model.to("cpu")
                    offloaded.append(name)
        for name in wanted:
            models[name].to(self.device)
        if offloaded:
            log.info("Moved %s to the CPU to make room for %s", ", ".join(offloaded), ", ".join(wanted))
        if self.device.type == "cuda" and offloaded:
            gc.collect()
            torch.cuda.empty_cache()
        return offloaded

    def compute_device(self) -> torch.device:
        return self.device
