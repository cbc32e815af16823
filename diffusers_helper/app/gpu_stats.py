"""One line about the GPU for the UI: memory in use and, when NVML is installed, utilisation and power."""

from __future__ import annotations

import torch

_nvml = None


def _nvml_handle(index: int):
    global _nvml
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception:  # noqa: BLE001 - NVML is optional
            _nvml = False
    if not _nvml:
        return None
    try:
        return _nvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001
        return None


def gpu_status(device: torch.device | None = None) -> str:
    if not torch.cuda.is_available():
        return "Computing on the CPU (no CUDA GPU)"
    device = device or torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    gb = 1024**3
    text = f"GPU {torch.cuda.get_device_name(device)}: {(total - free) / gb:.1f} / {total / gb:.1f} GB in use"
    handle = _nvml_handle(device.index or 0)
    if handle is not None:
        try:
            util = _nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            watts = _nvml.nvmlDeviceGetPowerUsage(handle) / 1000
            text += f", {util}% busy, {watts:.0f} W"
        except Exception:  # noqa: BLE001
            pass
    return text
