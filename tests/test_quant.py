"""Integer weights (torchao INT8/INT4, bitsandbytes) and the compile warm-up, on the tiny model."""

import copy

import pytest
import torch

from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.events import Finished
from diffusers_helper.memory.placement import Placement
from diffusers_helper.accel.quant import bnb_config, check_bnb_usable, has_quantized_weights
from diffusers_helper.accel.weights import apply_weight_format
from diffusers_helper.pipeline.prepare import TransformerPlan, apply_weights
from diffusers_helper.pipeline.request import GenerationRequest
from diffusers_helper.config import Settings, weight_format
from diffusers_helper.config.formats import WeightFormat
from diffusers_helper.app.startup import transformer_plan
from diffusers_helper.models.tiny import build_tiny_transformer
from diffusers_helper.pipeline.warmup import forward_fn, section_inputs

pytest.importorskip("torchao")

# relative L2 of one forward against the unquantized model (random tiny weights, fp32 activations)
TOLERANCE = {8: 0.02, 4: 0.05}


@pytest.fixture(scope="module")
def deep():
    return build_tiny_transformer(7, num_layers=3, num_single_layers=5).eval().requires_grad_(False)


def _forward(model):
    cond, noise = section_inputs(model, 64, torch.float32, torch.device("cpu"))
    return forward_fn(model, cond, noise, torch.float32, torch.device("cpu"))().float()


@pytest.mark.parametrize("bits", [8, 4])
def test_torchao_keeps_outputs_within_tolerance(deep, bits):
    model = copy.deepcopy(deep)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks." in n
               and "norm" not in n]
    active = apply_weight_format(model, WeightFormat(f"int{bits}"))
    assert active == {"int_linears": len(linears)} and len(linears) == 3 * 12 + 5 * 5
    assert has_quantized_weights(model) and not has_quantized_weights(deep)
    assert type(model.transformer_blocks[0].norm1.linear.weight.data) is torch.Tensor  # modulation stays float
    ref = _forward(deep)
    err = float((_forward(model) - ref).norm() / ref.norm())
    assert 0 < err < TOLERANCE[bits]


def test_a_converted_model_is_not_converted_again_nor_to_another_format(deep):
    model = copy.deepcopy(deep)
    first = apply_weights(model, WeightFormat("int8"))
    again = apply_weights(model, WeightFormat("int8"))
    assert first.details["int_linears"] == 61 and again.details == {} and "already applied" in again.summary
    with pytest.raises(ValueError, match="already prepared with weights"):
        apply_weights(model, WeightFormat("fp8"))
    with pytest.raises(ValueError, match="unknown weight format"):
        WeightFormat("int3")


def test_int8_engine_runs_under_streamed_placement(tiny_root, tmp_path, test_image):
    from diffusers_helper.models.loading import load_models
    from diffusers_helper.models.tiny import tiny_spec

    bundle = load_models(tiny_spec("tiny-f1", tiny_root))
    # torchao's tensor subclasses go through diffusers' group offloading instead of the block streamer
    engine = Engine(bundle, Placement(torch.device("cpu"), "swap"), outputs_dir=tmp_path,
                    plan=TransformerPlan(weights=WeightFormat("int8")))
    assert engine.report["weights"].details["int_linears"] > 0
    final = engine.generate(GenerationRequest(prompt="x", image=test_image, seconds=1, steps=2, cache="none"),
                            lambda e: None)
    assert isinstance(final, Finished) and final.frames > 0


def test_settings_map_to_quantization():
    s = Settings(enable_quant=True, quant_bits=4)
    assert transformer_plan(s).weights.torchao_bits == 4 and transformer_plan(Settings()).weights.kind == "bf16"
    nf4 = transformer_plan(Settings(use_bnb=True, bnb_load_in_4bit=True, bnb_double_quant=True)).weights
    assert nf4.bnb_bits == 4 and nf4.bnb_double_quant and not nf4.converted_after_loading
    assert transformer_plan(Settings(fp8_storage=True)).weights.kind == "fp8-storage"


def test_one_weight_format_wins_when_several_are_on():
    """FP8 and bitsandbytes both replace nn.Linear: start-up converts with one, and the compat check says which."""
    from diffusers_helper.app.compat import SystemInfo, check

    s = Settings(enable_fp8=True, use_bnb=True, enable_quant=True, quant_bits=4)
    assert weight_format(s) == "fp8" and transformer_plan(s).weights.kind == "fp8"
    s = Settings(use_bnb=True, enable_quant=True)
    assert weight_format(s) == "int8" and transformer_plan(s).weights.bnb_bits is None
    finding = next(f for f in check(s, SystemInfo(cuda=True)) if f.rule == "several-quantizers")
    assert "torchao INT8 (FRAMEPACK_ENABLE_QUANT) is used" in finding.message
    assert weight_format(Settings()) == "bf16" and weight_format(Settings(use_bnb=True, bnb_load_in_4bit=True)) == "nf4"


def test_bnb_config_keeps_embedders_and_modulation_in_bf16():
    eight = bnb_config(8)
    assert eight.load_in_8bit and "norm" in eight.llm_int8_skip_modules and "x_embedder" in eight.llm_int8_skip_modules
    four = bnb_config(4, double_quant=True)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bnb_without_cuda_says_what_to_use_instead(tiny_root, tmp_path):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*FRAMEPACK_ENABLE_QUANT"):
        check_bnb_usable()
    from diffusers_helper.app.service import EngineProvider

    provider = EngineProvider(models_dir=str(tiny_root), offline=True, outputs_dir=tmp_path,
                              plan=TransformerPlan(weights=WeightFormat("bnb8")))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        provider.get("tiny")


def test_warm_up_runs_two_text_lengths_and_fast_start_skips_it(tiny_bundles, tmp_path):
    engine = Engine(tiny_bundles["tiny"], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)
    assert engine.warm_up() is None  # nothing compiled: nothing to warm up
    engine.report["compile"].details["compiled_blocks"] = 2  # as if compiled; the warm-up itself is what is checked
    lengths = []
    hook = engine.bundle.transformer.context_embedder.register_forward_pre_hook(
        lambda m, args: lengths.append(int(args[2].sum())))
    try:
        assert engine.warm_up(size=64, window=3) >= 0
    finally:
        hook.remove()
    assert lengths == [60, 61]
    assert transformer_plan(Settings(fast_start=True, enable_compile=True)).compile.warmup is False
    assert transformer_plan(Settings(enable_compile=True)).compile.enabled and transformer_plan(Settings()).compile.warmup
    assert transformer_plan(Settings(enable_module_cache=False)).compile.module_cache is False
