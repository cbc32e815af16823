"""Where each model lives while a job runs.

Policies:
- "full": every model stays on the compute device (the original's high-VRAM mode, > 60 GB free, and
  the only sensible choice on the CPU).
- "swap": the smaller models move to the GPU when used and back when room is needed; the transformer
  and Llama, which do not fit a small GPU whole, are streamed block by block with diffusers group
  offloading (pinned memory, prefetch on a side stream) instead of the original's per-parameter moves.
- "swap-lowram": the same without a pinned copy of the weights, for machines short of RAM.
The choice comes from free VRAM and RAM (memory.choose_policy) and steps down after an OOM.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from .memory import EVERYTHING_GB, choose_policy, get_cuda_free_memory_gb, get_free_ram_gb, model_bytes

log = logging.getLogger("framepack.placement")

STREAMED = ("transformer", "text_encoder")


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_streamed(model) -> bool:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(model)


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
    policy: str  # "full", "swap" or "swap-lowram"
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
        if device.type != "cuda" and not override:
            log.info("Using full placement: computing on %s", device)
            return cls(device, "full")
        choice = choose_policy(get_cuda_free_memory_gb(device), get_free_ram_gb(), override=override,
                               everything_gb=EVERYTHING_GB)
        log.info("Using %s placement: %s", choice.policy, choice.reason)
        return cls(device, choice.policy)

    def degrade(self, bundle) -> str | None:
        """After an out-of-memory error: the next more frugal policy, applied now; None if none is left."""
        if self.policy != "full":
            return None
        for model in bundle.models().values():
            model.to("cpu")
        self.policy = "swap"
        self.prepare(bundle)
        return self.policy

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
            from diffusers.hooks import apply_group_offloading

            # side-stream prefetch needs pinned RAM; "swap-lowram" pins each group only while it moves
            stream = self.device.type == "cuda"
            apply_group_offloading(model, self.device, offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=stream, low_cpu_mem_usage=self.policy == "swap-lowram")
            log.info("Streaming %s block by block to %s%s", name, self.device,
                     "" if self.policy == "swap" else " (unpinned: little free RAM)")

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
