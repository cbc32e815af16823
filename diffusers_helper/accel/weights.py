"""Puts the transformer's weights in their format after loading, before placement lays them out.

bitsandbytes is not here: diffusers quantizes while loading (`quant.bnb_config`), so a bitsandbytes
transformer arrives already in its format."""

from __future__ import annotations

import logging

import torch

from ..config.formats import WeightFormat

log = logging.getLogger("framepack.weights")
GB = 1024**3


def model_bytes(model) -> int:
    """Bytes of a model's weights and buffers, in whatever dtypes they are stored."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def store_weights_in_fp8(model, compute_dtype: torch.dtype) -> int:
    """Keep weights as float8_e4m3fn and upcast each layer just before it runs (diffusers' layerwise
    casting): half the bf16 weight memory in RAM and VRAM, at some precision. Returns bytes saved."""
    before = model_bytes(model)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    saved = before - model_bytes(model)
    log.info("Transformer weights stored in FP8, computed in %s: %.2f GB saved",
             str(compute_dtype).removeprefix("torch."), saved / GB)
    return saved


def apply_weight_format(transformer, fmt: WeightFormat) -> dict:
    """Convert the loaded weights; returns what changed (layers converted, bytes saved) for the report."""
    if fmt.kind == "fp8":
        from .fp8 import convert_to_fp8

        n = convert_to_fp8(transformer, fmt.fp8_target_keys, fmt.fp8_exclude_keys, fmt.fp8_use_scaled_mm)
        return {"fp8_linears": n}
    if fmt.torchao_bits:
        from .quant import quantize_torchao

        return {"int_linears": quantize_torchao(transformer, fmt.torchao_bits)}
    if fmt.kind == "fp8-storage":
        return {"bytes_saved": store_weights_in_fp8(transformer, transformer.dtype)}
    return {}
