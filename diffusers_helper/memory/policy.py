"""GPU memory helpers the seeds name, and the placement-policy choice from free VRAM and RAM.

Models move whole (`move_model_to_device_with_memory_preservation`) or in bounded chunks of
parameters (`load_model_chunked`), so a transfer never needs more than one chunk of spare memory.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("framepack.memory")

GB = 1024**3
EVERYTHING_GB = 60.0  # every model on one GPU: transformer 26 GB + Llama 16 GB + activations (the original's
# high-VRAM threshold)
# Fragmentation-resistant allocator settings for small GPUs (read by PyTorch at its first CUDA call).
ALLOC_CONF_LOW_VRAM = "expandable_segments:True,max_split_size_mb=128"


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


def apply_alloc_preset(preset: str = "low-vram") -> str | None:
    """Set PYTORCH_CUDA_ALLOC_CONF unless the user did; only effective before CUDA is initialised."""
    if preset != "low-vram" or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        return os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        log.warning("CUDA is already initialised; the allocator preset applies from the next start")
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF_LOW_VRAM
    return ALLOC_CONF_LOW_VRAM


def force_free_vram(target_gb: float, device: torch.device | None = None, models=()) -> float:
    """Free cached blocks, then move the given models (largest first) to the CPU until `target_gb` is
    free. Returns the free GB reached (0 on a machine without CUDA)."""
    if not torch.cuda.is_available():
        return 0.0
    gc.collect()
    torch.cuda.empty_cache()
    free = get_cuda_free_memory_gb(device)
    for model in sorted(models, key=model_bytes, reverse=True):
        if free >= target_gb:
            break
        model.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()
        free = get_cuda_free_memory_gb(device)
    log.info("Free VRAM after clean-up: %.2f GB (target %.2f GB)", free, target_gb)
    return free


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())


def load_model_chunked(model: torch.nn.Module, device: torch.device | str, max_chunk_size_mb: int = 256) -> int:
    """Move a model's tensors to `device` in groups of at most `max_chunk_size_mb`, emptying the cache
    between groups, so the move needs one chunk of headroom instead of a copy of the model. Returns
    the number of chunks."""
    device = torch.device(device)
    limit = max_chunk_size_mb * 1024**2
    tensors = [(m, n, t, False) for m in model.modules() for n, t in m._parameters.items() if t is not None]
    tensors += [(m, n, t, True) for m in model.modules() for n, t in m._buffers.items() if t is not None]
    chunks, size = 0, 0
    for module, name, tensor, is_buffer in tensors:
        moved = tensor.data.to(device, non_blocking=False)
        if is_buffer:
            module._buffers[name] = moved
        else:
            tensor.data = moved
        size += moved.numel() * moved.element_size()
        if size >= limit:
            chunks, size = chunks + 1, 0
            if device.type != "cuda" and torch.cuda.is_available():
                torch.cuda.empty_cache()
    return chunks + (1 if size else 0)


def move_model_to_device_with_memory_preservation(model, target_device, preserved_memory_gb: float = 0.0) -> bool:
    """Move the model only if `preserved_memory_gb` stays free afterwards; returns whether it moved."""
    target_device = torch.device(target_device)
    if target_device.type != "cuda":
        model.to(target_device)
        return True
    free = get_cuda_free_memory_gb(target_device)
    need = model_bytes(model) / GB
    if free - need < preserved_memory_gb:
        log.info("Keeping %s on the CPU: %.1f GB needed, %.1f GB free, %.1f GB to preserve",
                 model.__class__.__name__, need, free, preserved_memory_gb)
        return False
    model.to(target_device)
    return True


def offload_model_from_device_for_memory_preservation(model, target_device, preserved_memory_gb: float = 0.0,
                                                      aggressive: bool = False) -> bool:
    """Move the model to the CPU when less than `preserved_memory_gb` is free (always when aggressive)."""
    target_device = torch.device(target_device)
    if target_device.type == "cuda" and not aggressive and get_cuda_free_memory_gb(target_device) >= \
            preserved_memory_gb:
        return False
    model.to("cpu")
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
    return True


def store_weights_in_fp8(model, compute_dtype: torch.dtype) -> int:
    """Keep weights as float8_e4m3fn and upcast each layer just before it runs (diffusers' layerwise
    casting): half the bf16 weight memory in RAM and VRAM, at some precision. Returns bytes saved."""
    before = model_bytes(model)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    saved = before - model_bytes(model)
    log.info("Transformer weights stored in FP8, computed in %s: %.2f GB saved",
             str(compute_dtype).removeprefix("torch."), saved / GB)
    return saved


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
