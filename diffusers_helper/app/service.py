"""Keeps one engine per session and swaps models when the user picks another one.

FramePack and F1 share every part but the transformer, so switching between them loads only the
13B transformer instead of the whole 30 GB stack.
"""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path

import torch

from ..pipeline.engine import Engine
from ..models.loading import PART_NAMES, ModelBundle, load_models, resolve_spec
from ..memory.placement import Placement, model_devices, pick_device, release_streamer
from ..pipeline.prepare import TransformerPlan, mark_applied

log = logging.getLogger("framepack.service")


class EngineProvider:
    def __init__(self, *, models_dir: str | None = None, offline: bool | None = None, device: str | None = None,
                 outputs_dir: str | Path = "outputs", placement: str | None = None, decode_options=None,
                 async_decode: str = "auto", plan: TransformerPlan | None = None, opt_cache: str | None = None,
                 devices: dict[str, str | None] | None = None, lora_dir: str | Path = "loras"):
        self.models_dir = models_dir
        self.offline = offline
        self.device = pick_device(device)
        self.devices = model_devices(self.device, devices or {})  # models placed on a device of their own
        self.outputs_dir = Path(outputs_dir).resolve()  # absolute: API users get usable paths
        self.placement_override = placement
        self.decode_options = decode_options
        self.async_decode = async_decode
        self.plan = plan or TransformerPlan()
        self.opt_cache = opt_cache  # where FP8 / torchao transformers are cached, or None
        self.lora_dir = Path(lora_dir)
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> str | None:
        return self._engine.spec.name if self._engine else None

    def get(self, model: str, progress=None) -> Engine:
        with self._lock:
            if self._engine is not None and self._engine.spec.name == model:
                return self._engine
            spec = resolve_spec(model, models_dir=self.models_dir)
            old = self._engine.bundle if self._engine is not None else None
            keep = {}
            if old is not None:
                old_parts = old.spec.parts()
                keep = {n: getattr(old, n) for n, part in spec.parts().items() if old_parts.get(n) == part}
                log.info("Switching model %s -> %s; reusing %s", old.spec.name, model, ", ".join(keep) or "nothing")
                if "transformer" not in keep:
                    release_streamer(old.transformer)  # unpin before its buffers are freed
                self._engine = None
                del old
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            cached_path = self._opt_cache_path(spec)
            if cached_path is not None:
                transformer = self._load_cached(cached_path, spec)
                if transformer is not None:
                    mark_applied(transformer, "weights", self.plan.weights)  # converted already: not again
                    keep["transformer"] = transformer
            missing = [n for n in PART_NAMES if n not in keep]
            fresh = load_models(spec, offline=self.offline, parts=missing, progress=progress,
                                transformer_kwargs=self._transformer_kwargs(spec))
            bundle = ModelBundle(spec=spec, **keep, **{n: getattr(fresh, n) for n in missing})
            placement = Placement.choose(self.device, self.placement_override, self.devices)
            self._engine = Engine(bundle, placement, outputs_dir=self.outputs_dir,
                                  decode_options=self.decode_options, async_decode=self.async_decode,
                                  plan=self.plan, lora_dir=self.lora_dir)
            if cached_path is not None and "transformer" in missing:
                from ..accel.opt_cache import save_optimized

                save_optimized(bundle.transformer, cached_path, self._opt_key(spec), self.plan.weights.kind)
            if self.plan.compile.warmup:
                if progress is not None:
                    progress("Compiling the transformer (warm-up)")
                self._engine.warm_up()
            return self._engine

    def _transformer_kwargs(self, spec) -> dict | None:
        bits = self.plan.weights.bnb_bits
        if not bits:
            return None
        from ..accel.quant import bnb_config, check_bnb_usable

        check_bnb_usable()
        log.info("Loading the transformer with bitsandbytes %d-bit weights", bits)
        return {"quantization_config": bnb_config(bits, self.plan.weights.bnb_double_quant,
                                                  spec.transformer.dtype or torch.bfloat16)}

    def _opt_key(self, spec) -> str:
        from ..accel.opt_cache import cache_key

        fmt = self.plan.weights
        return cache_key(spec.transformer.repo, spec.transformer.dtype, fmt.kind, fmt.cache_options())

    def _opt_cache_path(self, spec):
        """Only formats converted after loading are worth saving (bitsandbytes quantizes while loading)."""
        if not self.opt_cache or not self.plan.weights.converted_after_loading:
            return None
        from ..accel.opt_cache import cache_path

        return cache_path(self.opt_cache, spec.name, self.plan.weights.kind, self._opt_key(spec))

    def _load_cached(self, path, spec):
        from diffusers import HunyuanVideoFramepackTransformer3DModel

        from ..accel.opt_cache import load_optimized

        fmt = self.plan.weights
        return load_optimized(HunyuanVideoFramepackTransformer3DModel, path, self._opt_key(spec),
                              spec.transformer.dtype, fmt.kind, fmt.cache_options())
