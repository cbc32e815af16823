"""Row-wise scaled FP8 linear layers for the transformer (FRAMEPACK_ENABLE_FP8).

Weights are stored as float8_e4m3fn with one scale per output row; activations are quantised per
row on the fly, and on GPUs with FP8 tensor cores (compute capability 8.9+) the product runs through
`torch._scaled_mm` with both row-wise scales, accumulating in float32 and writing bf16. Elsewhere, or
with FRAMEPACK_FP8_USE_SCALED_MM=0, the weight is dequantised and multiplied in the compute dtype:
the same weight memory saving with bf16 arithmetic.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("framepack.fp8")

E4M3_MAX = 448.0


def _row_scale(x: torch.Tensor) -> torch.Tensor:
    return (x.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp_min(1e-12)


def scaled_mm_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and \
        hasattr(torch, "_scaled_mm")


class FP8Linear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, use_scaled_mm: bool = True):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = _row_scale(w)  # (out, 1)
        self.weight = torch.nn.Parameter((w.float() / scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out), float32
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.use_scaled_mm = use_scaled_mm
        # torch._scaled_mm needs both dimensions divisible by 16
        self.mm_ok = self.in_features % 16 == 0 and self.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.use_scaled_mm and self.mm_ok and scaled_mm_available(x.device):
            xs = _row_scale(x2)
            xq = (x2.float() / xs).to(torch.float8_e4m3fn)
            out = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale, out_dtype=x.dtype,
                                   bias=None if self.bias is None else self.bias.to(x.dtype))
        else:
            w = (self.weight.float() * self.weight_scale.t()).to(x.dtype)
            out = F.linear(x2, w, None if self.bias is None else self.bias.to(x.dtype))
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scaled_mm={self.use_scaled_mm and self.mm_ok}"


def convert_to_fp8(model: torch.nn.Module, target_keys=(), exclude_keys=("norm",), use_scaled_mm: bool = True,
                   scope=("transformer_blocks", "single_transformer_blocks")) -> int:
    """Replace the linears inside the repeated blocks (names containing a target key, if any are
    given, and none of the exclude keys). Returns how many were converted."""
    converted = 0
    for name, module in list(model.named_modules()):
        if not name.startswith(tuple(scope)):
            continue
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}"
            if not isinstance(child, torch.nn.Linear):
                continue
            if target_keys and not any(k in full for k in target_keys):
                continue
            if any(k in full for k in exclude_keys):
                continue
            setattr(module, child_name, FP8Linear(child, use_scaled_mm))
            converted += 1
    log.info("FP8 optimization active: %d linear layers (row-wise scales, scaled_mm %s)", converted,
             "on" if use_scaled_mm else "off")
    return converted
