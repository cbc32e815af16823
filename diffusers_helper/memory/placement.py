"""Where each model lives while a job runs.

Policies:
- "full": every model stays on the compute device (the original's high-VRAM mode, > 60 GB free, and
  the only sensible choice on the CPU).
- "swap": the smaller models move to the GPU when used and back when room is needed. The transformer
  keeps on the GPU the blocks that fit (after the memory the user preserves) and streams the rest from
  pinned RAM (block_stream); Llama, used once per job, is streamed block by block with diffusers group
  offloading. Both replace the original's per-parameter moves.
- "swap-lowram": the same without a pinned copy of the weights, for machines short of RAM.
The choice comes from free VRAM and RAM (`policy.choose_policy`) and steps down after an OOM: from "full"
to "swap", then to fewer resident blocks.

Each model has a device. By default all share the compute device and the policy above moves them; a model
given its own device (a second GPU for the VAE or the text encoders) is placed there once and never moved,
so it takes no room on the compute GPU and a step-down never touches it while another thread uses it.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from .block_stream import BlockStreamer
from ..accel.quant import has_quantized_weights
from ..accel.weights import model_bytes
from .policy import EVERYTHING_GB, choose_policy, cuda_free_bytes, get_cuda_free_memory_gb, get_free_ram_gb

MODEL_ROLES = ("text_encoder", "text_encoder_2", "image_encoder", "transformer", "vae")

log = logging.getLogger("framepack.placement")


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return check_device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name: str, what: str = "device") -> torch.device:
    """A device that exists on this machine, or a ValueError that says which ones do."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what} {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{what} {name!r}: this machine has no CUDA GPU; use cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{what} {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise ValueError(f"{what} {name!r} is not supported; use cpu, cuda or cuda:N")
    return device


def model_devices(compute: torch.device, requested: dict[str, str | None]) -> dict[str, torch.device]:
    """The models given a device of their own (e.g. {"vae": "cuda:1"}); empty or equal entries share `compute`."""
    devices = {}
    for role, name in requested.items():
        if role not in MODEL_ROLES or role == "transformer":  # the transformer's device is the compute device
            raise ValueError(f"unknown model {role!r}; one of {', '.join(MODEL_ROLES)}")
        if name:
            device = check_device(name, f"{role} device")
            if device != compute:
                devices[role] = device
    if "text_encoder" in devices and "text_encoder_2" not in devices:
        devices["text_encoder_2"] = devices["text_encoder"]  # the two text encoders run together
    return devices


def _is_streamed(model) -> bool:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(model)


def streamer_of(model) -> BlockStreamer | None:
    return getattr(model, "_framepack_streamer", None)


def release_streamer(model) -> None:
    """Before a streamed model is dropped: unhook it and unpin its host buffers. Freed while still page-locked,
    their address range stays registered with CUDA, and pinning the next model there fails ("resource already
    mapped")."""
    streamer = streamer_of(model)
    if streamer is not None:
        streamer.close(keep_usable=False)
        del model._framepack_streamer


def _streams(model) -> bool:
    """Moved block by block (our streamer or diffusers' group offloading), never whole."""
    return streamer_of(model) is not None or _is_streamed(model)


def _is_bnb(model) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def _block_lists(model) -> list:
    return [getattr(model, n) for n in ("transformer_blocks", "single_transformer_blocks") if hasattr(model, n)]


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
    resident_cap: int | None = None  # bytes of resident blocks allowed; halved by each out-of-memory error
    skip_blocks: Callable[[], bool] | None = None
    devices: dict[str, torch.device] = field(default_factory=dict)  # models placed on a device of their own

    def device_of(self, name: str) -> torch.device:
        return self.devices.get(name, self.device)

    def own_device(self, name: str) -> bool:
        """Placed once on another device than the compute device, and never moved by this policy."""
        return self.device_of(name) != self.device

    def describe(self) -> str:
        """One line for the log: where each model runs."""
        groups: dict[str, list[str]] = {str(self.device): []}  # the compute device first
        for role in MODEL_ROLES:
            groups.setdefault(str(self.device_of(role)), []).append(role)
        return "; ".join(f"{', '.join(roles)} on {device}" for device, roles in groups.items())

    def _free_used(self) -> tuple[int, int]:
        if self.probe is not None:
            return self.probe()
        if self.device.type == "cuda":
            return cuda_free_bytes(self.device), torch.cuda.memory_allocated(self.device)
        return 1 << 62, 0

    @classmethod
    def choose(cls, device: torch.device, override: str | None = None,
               devices: dict[str, torch.device] | None = None) -> "Placement":
        devices = dict(devices or {})
        if device.type != "cuda" and not override:
            log.info("Using full placement: computing on %s", device)
            placement = cls(device, "full", devices=devices)
        else:
            choice = choose_policy(get_cuda_free_memory_gb(device), get_free_ram_gb(), override=override,
                                   everything_gb=EVERYTHING_GB)
            log.info("Using %s placement: %s", choice.policy, choice.reason)
            placement = cls(device, choice.policy, devices=devices)
        log.info("Model devices: %s", placement.describe())
        return placement

    def degrade(self, bundle) -> str | None:
        """After an out-of-memory error: the next more frugal placement, applied now, described for the
        user; None if nothing is left to give up."""
        if self.policy == "full":
            for name, model in bundle.models().items():
                if not self.own_device(name):  # a model on its own device may be in use by the decode thread
                    model.to("cpu")
            self.policy = "swap"
            self.prepare(bundle, skip_blocks=self.skip_blocks)
            self.use(bundle, "transformer")
            return "switched to swap placement"
        streamer = streamer_of(bundle.transformer)
        if streamer is None or streamer.resident_count == 0:
            return None
        before = streamer.resident_count
        self.resident_cap = streamer.resident_bytes // 2
        self._activate(streamer)
        return f"kept {streamer.resident_count} transformer blocks on the GPU instead of {before}"

    def prepare(self, bundle, skip_blocks: Callable[[], bool] | None = None) -> None:
        """One-time set-up after loading. `skip_blocks` says when the step cache skips the blocks, so a
        skipped step moves no weights."""
        models = bundle.models()
        self.skip_blocks = skip_blocks
        for name in self.devices:
            if name in models:
                models[name].to(self.devices[name])
        models = {n: m for n, m in models.items() if not self.own_device(n)}
        if self.policy == "full":
            for model in models.values():
                model.to(self.device)
            return
        pinned = self.policy == "swap" and self.device.type == "cuda"
        transformer = models.get("transformer")
        if transformer is not None and not _streams(transformer):
            if _is_bnb(transformer):
                log.info("bitsandbytes transformer (%.1f GB) moves to the GPU whole when used",
                         model_bytes(transformer) / 1024**3)
            elif has_quantized_weights(transformer):  # torchao tensors: diffusers' offloading handles them
                self._group_offload(transformer, "transformer", pinned)
            elif _block_lists(transformer):
                transformer._framepack_streamer = BlockStreamer(transformer, _block_lists(transformer), self.device,
                                                                pin=pinned, skip=skip_blocks)
        model = models.get("text_encoder")
        if model is not None and not _is_streamed(model):  # a part reused from the previous model keeps its hooks
            self._group_offload(model, "text encoder", pinned)

    def _group_offload(self, model, what: str, pinned: bool) -> None:
        from diffusers.hooks import apply_group_offloading

        # side-stream prefetch needs pinned RAM; "swap-lowram" pins each group only while it moves
        stream = self.device.type == "cuda"
        apply_group_offloading(model, self.device, offload_type="block_level", num_blocks_per_group=1,
                               use_stream=stream, record_stream=stream, low_cpu_mem_usage=self.policy == "swap-lowram")
        log.info("Streaming the %s block by block to %s with diffusers group offloading%s", what, self.device,
                 "" if pinned else " (unpinned)")

    def _activate(self, streamer: BlockStreamer) -> int:
        """Resident blocks for what is free now, less the memory the user preserves for activations."""
        free, _ = self._free_used()
        budget = int(free + streamer.gpu_bytes - self.memory.preserve_gb * 1024**3)
        return streamer.activate(budget, self.resident_cap)

    def use(self, bundle, *names: str) -> list[str]:
        """Make the named models ready on the device. Under "swap", other models go back to the CPU
        when the memory policy asks for room; returns the names moved off, for the log and tests."""
        if self.policy == "full":
            return []
        models = {n: m for n, m in bundle.models().items() if not self.own_device(n)}  # those never move
        streamer = streamer_of(models.get("transformer"))
        wanted = [n for n in names if n in models and not _streams(models[n])]
        needed = sum(model_bytes(models[n]) for n in wanted if not _on_device(models[n], self.device))
        gb = 1024**3
        offloaded = []
        if not self.memory.keep_loaded:
            for name, model in models.items():
                if name in names:
                    continue
                if name == "transformer" and streamer is not None:
                    on_device = streamer.active
                else:
                    on_device = not _streams(model) and _on_device(model, self.device)
                if not on_device:
                    continue
                free, used = self._free_used()
                over_threshold = used + needed > self.memory.offload_threshold_gb * gb
                short = free - needed < self.memory.preserve_gb * gb
                if over_threshold or short:
                    streamer.release() if name == "transformer" and streamer is not None else model.to("cpu")
                    offloaded.append(name)
        for name in wanted:
            models[name].to(self.device)
        if "transformer" in names and streamer is not None:
            self._activate(streamer)
        if offloaded:
            log.info("Moved %s to the CPU to make room for %s", ", ".join(offloaded), ", ".join(names))
        if self.device.type == "cuda" and offloaded:
            gc.collect()
            torch.cuda.empty_cache()
        return offloaded

    def compute_device(self) -> torch.device:
        return self.device
