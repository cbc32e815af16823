"""The transformer's weight format: which of the quantizers a user asked for is used."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schema import Settings

def weight_formats(s: "Settings") -> list[str]:
    """The transformer weight formats the settings ask for, in the order start-up prefers them.

    A linear layer can be replaced by one quantizer only, so start-up uses the first and the
    "several-quantizers" compatibility check names the rest as ignored."""
    chosen = []
    if s.enable_fp8:
        chosen.append("fp8")
    if s.enable_quant:
        chosen.append(f"int{s.quant_bits}")
    if s.use_bnb:
        chosen.append("nf4" if s.bnb_load_in_4bit else "bnb8")
    return chosen or ["bf16"]


def weight_format(s: "Settings") -> str:
    """The one format the transformer's weights run in ("bf16", "fp8", "int8", "int4", "bnb8", "nf4")."""
    return weight_formats(s)[0]


TORCHAO_BITS = {"int8": 8, "int4": 4}  # the torchao formats and their widths
WEIGHT_FORMAT_NAMES = {"bf16": "bf16", "fp8": "FP8 (FRAMEPACK_ENABLE_FP8)",
                       "int8": "torchao INT8 (FRAMEPACK_ENABLE_QUANT)", "int4": "torchao INT4 (FRAMEPACK_ENABLE_QUANT)",
                       "bnb8": "bitsandbytes 8-bit (FRAMEPACK_USE_BNB)", "nf4": "bitsandbytes NF4 (FRAMEPACK_USE_BNB)"}


