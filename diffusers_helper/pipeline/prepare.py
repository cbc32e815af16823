"""`prepare_transformer`: every change made to the loaded transformer, as named steps in one declared order.

    weights -> compile -> context parallel -> step caches -> placement -> attention

- weights first: placement lays out (and the block streamer copies) the weights as they will run, and compile
  traces the converted layers;
- compile wraps each block's own forward before any hook is registered, so every hook (caches, offloading)
  stays outside the graph, in Python: no cache state becomes a guard, nothing recompiles per step;
- context parallel (several GPUs sharing each forward) before the step caches: its split and gather hooks then sit
  inside the caches' hooks, so a cache sees whole tensors and every rank takes the same decision;
- the step caches before placement: offloading hooks must wrap the caches' hooks, so a block's weights are on
  the GPU when a cache reads it, and the streamer must know which steps skip the blocks;
- the attention backend last: it only sets the processors' kernel, which compiled graphs read at run time.

What each step applied is recorded on the model (one attribute), so preparing a model again (a second engine
on the same models, a job after a model switch) does not convert or compile twice; the returned report goes
to the log and into every job's sidecar.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..accel.attention import AttentionConfig, apply_attention
from ..accel.compile import CompileConfig, apply_compile
from ..accel.context_parallel import CP_BACKENDS, ContextParallel, apply_context_parallel
from ..accel.weights import apply_weight_format
from ..caches.base import StepCaches
from ..config.formats import WeightFormat
from ..memory.placement import Placement

log = logging.getLogger("framepack.prepare")

APPLIED = "_framepack_applied"  # the one record on the model: step name -> the config it was applied with


@dataclass(frozen=True)
class TransformerPlan:
    """What to do to the transformer, one config per step."""

    weights: WeightFormat = field(default_factory=WeightFormat)
    step_caches: tuple[str, ...] | None = None  # names in caches.base.STEP_CACHES; None: every registered one
    cache_store: str | None = None  # where caches keep calibrated data (MagCache ratios); None: nowhere
    compile: CompileConfig = field(default_factory=CompileConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    context_parallel: ContextParallel = field(default_factory=ContextParallel)


@dataclass(frozen=True)
class StepReport:
    step: str
    summary: str  # one line for the log and the sidecar
    details: dict = field(default_factory=dict)


@dataclass
class PrepareReport:
    steps: list[StepReport] = field(default_factory=list)
    step_caches: StepCaches | None = None

    def __getitem__(self, step: str) -> StepReport:
        return next(s for s in self.steps if s.step == step)

    def to_record(self) -> dict:
        return {s.step: s.summary for s in self.steps}


def applied(model) -> dict:
    """Step name -> config for the steps already applied to this model."""
    record = getattr(model, APPLIED, None)
    if record is None:
        record = {}
        setattr(model, APPLIED, record)
    return record


def mark_applied(model, step: str, config) -> None:
    """For code that builds a model already in a step's state (the optimized-model cache)."""
    applied(model)[step] = config


def _once(model, step: str, config, apply):
    """Apply a step unless it already was with this config; another config on a converted model is an error."""
    done = applied(model)
    if step in done:
        if done[step] != config:
            raise ValueError(f"the transformer was already prepared with {step} = {done[step]!r}; reload it to use "
                             f"{config!r}")
        return None
    result = apply()
    done[step] = config
    return result


def apply_weights(model, fmt: WeightFormat) -> StepReport:
    if fmt.bnb_bits:  # quantized by diffusers while loading; nothing left to convert
        mark_applied(model, "weights", fmt)
        return StepReport("weights", fmt.name, {"loaded_quantized": True})
    changed = _once(model, "weights", fmt, lambda: apply_weight_format(model, fmt))
    details = changed or {}
    summary = fmt.name if changed is not None else f"{fmt.name} (already applied)"
    return StepReport("weights", summary, details)


def apply_step_caches(model, names: tuple[str, ...] | None) -> tuple[StepReport, StepCaches]:
    """Attach the caches' hooks once; the record keeps them, and each job turns one on."""
    done = applied(model)
    if "step_caches" in done and names is not None and tuple(done["step_caches"][0]) != tuple(names):
        raise ValueError(f"the transformer already has the step caches {done['step_caches'][0]}; reload it to use "
                         f"{names}")
    if "step_caches" not in done:
        caches = StepCaches(model, list(names) if names is not None else None)
        done["step_caches"] = (tuple(caches.caches), caches)
    caches = done["step_caches"][1]
    return StepReport("step_caches", f"{', '.join(caches.caches) or 'none'} (each job picks one or none)"), caches


def apply_placement(bundle, placement: Placement, cache: StepCaches) -> StepReport:
    placement.prepare(bundle, skip_blocks=cache.skipping)
    return StepReport("placement", f"{placement.policy}: {placement.describe()}", {"policy": placement.policy})


def apply_compile_step(model, config: CompileConfig) -> StepReport:
    if not config.enabled:
        return StepReport("compile", "off")
    blocks = _once(model, "compile", config.mode, lambda: apply_compile(model, config))
    summary = f"{blocks} repeated blocks, mode {config.mode}" if blocks is not None else "already compiled"
    return StepReport("compile", summary, {"compiled_blocks": blocks or 0})


def apply_context_parallel_step(model, cp: ContextParallel) -> StepReport:
    if not cp.enabled:
        return StepReport("context_parallel", "off")
    summary = _once(model, "context_parallel", cp, lambda: apply_context_parallel(model, cp))
    return StepReport("context_parallel", summary or "already applied", {"ranks": cp.degree})


def apply_attention_step(model, config: AttentionConfig, cp: ContextParallel) -> StepReport:
    backend = apply_attention(model, config)
    kernel = lambda: getattr(model.transformer_blocks[0].attn.processor, "_attention_backend", None)  # noqa: E731
    if cp.enabled and kernel() not in (None, *CP_BACKENDS):
        log.warning("Attention backend %s cannot split across GPUs; using PyTorch SDPA", backend)
        backend = apply_attention(model, AttentionConfig())
    if cp.enabled and cp.attention == "ring" and kernel() in (None, "native"):
        # ring attention merges partial results by their log-sum-exp, which SDPA's dispatcher does not return
        log.info("Ring attention needs the log-sum-exp: using the cuDNN kernel")
        backend = apply_attention(model, AttentionConfig(backend="cudnn"))
    return StepReport("attention", backend)


def prepare_transformer(bundle, plan: TransformerPlan, placement: Placement) -> PrepareReport:
    """Run the steps in their declared order on `bundle.transformer`; `placement` places the whole bundle."""
    model = bundle.transformer
    report = PrepareReport()
    report.steps.append(apply_weights(model, plan.weights))
    report.steps.append(apply_compile_step(model, plan.compile))
    report.steps.append(apply_context_parallel_step(model, plan.context_parallel))
    step, report.step_caches = apply_step_caches(model, plan.step_caches)
    report.steps.append(step)
    report.steps.append(apply_placement(bundle, placement, report.step_caches))
    report.steps.append(apply_attention_step(model, plan.attention, plan.context_parallel))
    for s in report.steps:
        log.info("Transformer %s: %s", s.step.replace("_", " "), s.summary)
    return report
