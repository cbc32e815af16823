"""Integer weights for the transformer: torchao INT8/INT4 after loading, or bitsandbytes 8/4-bit through
diffusers' quantization config at loading.

Only the linears inside the 60 blocks are quantized (almost all of the 13B weights); the modulation
linears ("norm" in their names), the embedders and the output projection stay in bf16, as for FP8.
- torchao 8-bit: int8 weights and per-token int8 activations, so the matmuls run on int8 tensor cores
  (fused by torch.compile); 4-bit: int4 weights in groups of 128, dequantized per matmul (memory, not
  speed).
- bitsandbytes: LLM.int8 or NF4; its kernels need a CUDA GPU, and its weights stay on that GPU.
"""

from __future__ import annotations

import logging
import torch

log = logging.getLogger("framepack.quant")

EXCLUDE = ("norm",)  # modulation linears: small, and every token's scale and shift depend on them


def _block_linear(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and "transformer_blocks." in name and \
        not any(key in name for key in EXCLUDE)


def torchao_config(bits: int, group: int = 128):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if bits == 8:
        return Int8DynamicActivationInt8WeightConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))


def quantize_torchao(transformer, bits: int) -> int:
    """Quantize the blocks' linears in place; returns how many."""
    try:
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise RuntimeError("FRAMEPACK_ENABLE_QUANT needs torchao: pip install -r requirements-optional.txt") from exc
    linears = [m for n, m in transformer.named_modules() if _block_linear(m, n)]
    group = next((g for g in (128, 64, 32) if all(m.in_features % g == 0 for m in linears)), 16)
    quantize_(transformer, torchao_config(bits, group), filter_fn=_block_linear)
    names = linears
    log.info("torchao INT%d weights for %d transformer linears (%s)", bits, len(names),
             "int8 matmuls" if bits == 8 else "int4 weights, dequantized per matmul")
    return len(names)


def bnb_config(bits: int, double_quant: bool = False, compute_dtype: torch.dtype = torch.bfloat16):
    """The diffusers quantization config passed to from_pretrained."""
    from diffusers import BitsAndBytesConfig

    # substring matches on module names: the embedders (and the token refiner inside context_embedder)
    # and every modulation linear
    keep = ["x_embedder", "context_embedder", "time_text_embed", "image_projection", "norm"]
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=double_quant, llm_int8_skip_modules=keep)


def check_bnb_usable() -> None:
    """bitsandbytes' kernels and diffusers' loader need a CUDA GPU: say so before loading 26 GB."""
    if not torch.cuda.is_available():
        raise RuntimeError("FRAMEPACK_USE_BNB needs a CUDA GPU (bitsandbytes quantizes while loading onto it); "
                           "on this machine use FRAMEPACK_ENABLE_QUANT=1 (torchao) or FRAMEPACK_FP8_STORAGE=1")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("FRAMEPACK_USE_BNB needs bitsandbytes: pip install -r requirements-optional.txt") from exc


def has_quantized_weights(model) -> bool:
    """Tensor-subclass (torchao) or bitsandbytes parameters: these cannot go through the block streamer."""
    return any(type(p.data) is not torch.Tensor or type(p).__module__.startswith("bitsandbytes")
               for p in model.parameters())
