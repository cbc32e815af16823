"""The transformer's weight format: one type that owns every way of storing or computing the weights in
fewer bits, and the rule that picks one when the settings ask for several."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schema import Settings

KINDS = ("bf16", "fp8", "int8", "int4", "bnb8", "nf4", "fp8-storage")
TORCHAO_BITS = {"int8": 8, "int4": 4}  # the torchao formats and their widths
BNB_BITS = {"bnb8": 8, "nf4": 4}  # bitsandbytes, quantized while loading
WEIGHT_FORMAT_NAMES = {"bf16": "bf16", "fp8": "FP8 (FRAMEPACK_ENABLE_FP8)",
                       "int8": "torchao INT8 (FRAMEPACK_ENABLE_QUANT)", "int4": "torchao INT4 (FRAMEPACK_ENABLE_QUANT)",
                       "bnb8": "bitsandbytes 8-bit (FRAMEPACK_USE_BNB)", "nf4": "bitsandbytes NF4 (FRAMEPACK_USE_BNB)",
                       "fp8-storage": "FP8 storage (FRAMEPACK_FP8_STORAGE)"}


def weight_formats(s: "Settings") -> list[str]:
    """The weight formats the settings ask for, in the order start-up prefers them.

    A weight can be stored one way only, so start-up uses the first and the "several-quantizers"
    compatibility check names the rest as ignored."""
    chosen = []
    if s.enable_fp8:
        chosen.append("fp8")
    if s.enable_quant:
        chosen.append(f"int{s.quant_bits}")
    if s.use_bnb:
        chosen.append("nf4" if s.bnb_load_in_4bit else "bnb8")
    if s.fp8_storage:
        chosen.append("fp8-storage")
    return chosen or ["bf16"]


def weight_format(s: "Settings") -> str:
    """The one format the transformer's weights run in."""
    return weight_formats(s)[0]


@dataclass(frozen=True)
class WeightFormat:
    """How the transformer's weights are stored and multiplied.

    - "bf16": as loaded;
    - "fp8": row-wise FP8 linears in the blocks (FP8 matmuls on Ada/Hopper);
    - "int8" / "int4": torchao integer linears in the blocks;
    - "bnb8" / "nf4": bitsandbytes, applied by diffusers while loading;
    - "fp8-storage": every weight stored in FP8 and upcast per layer (memory only, bf16 arithmetic).
    """

    kind: str = "bf16"
    fp8_target_keys: tuple[str, ...] = ()
    fp8_exclude_keys: tuple[str, ...] = ("norm",)
    fp8_use_scaled_mm: bool = True
    bnb_double_quant: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown weight format {self.kind!r}; one of {', '.join(KINDS)}")

    @classmethod
    def from_settings(cls, s: "Settings") -> "WeightFormat":
        return cls(weight_format(s), tuple(s.fp8_target_keys), tuple(s.fp8_exclude_keys), s.fp8_use_scaled_mm,
                   s.bnb_double_quant)

    @property
    def name(self) -> str:
        return WEIGHT_FORMAT_NAMES[self.kind]

    @property
    def torchao_bits(self) -> int | None:
        return TORCHAO_BITS.get(self.kind)

    @property
    def bnb_bits(self) -> int | None:
        return BNB_BITS.get(self.kind)

    @property
    def converted_after_loading(self) -> bool:
        """Converted from the loaded bf16 weights, so the result is worth saving (the optimized-model cache)."""
        return self.kind in ("fp8", "int8", "int4")

    def cache_options(self) -> dict:
        """What, besides the kind, decides the converted weights (part of the optimized-model cache key)."""
        if self.kind != "fp8":
            return {}
        return {"target_keys": self.fp8_target_keys, "exclude_keys": self.fp8_exclude_keys,
                "use_scaled_mm": self.fp8_use_scaled_mm}
