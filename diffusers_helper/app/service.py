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
from ..memory.placement import Placement, pick_device

log = logging.getLogger("framepack.service")


class EngineProvider:
    def __init__(self, *, models_dir: str | None = None, offline: bool | None = None, device: str | None = None,
                 outputs_dir: str | Path = "outputs", placement: str | None = None, decode_options=None,
                 async_decode: str = "auto", speed=None, fp8_storage: bool = False,
                 opt_cache: str | None = None, bnb=None):
        self.models_dir = models_dir
        self.offline = offline
        self.device = pick_device(device)
        self.outputs_dir = Path(outputs_dir).resolve()  # absolute: API users get usable paths
        self.placement_override = placement
        self.decode_options = decode_options
        self.async_decode = async_decode
        self.speed = speed
        self.fp8_storage = fp8_storage
        self.opt_cache = opt_cache  # where FP8 / torchao transformers are cached, or None
        self.bnb = bnb  # quant.QuantOptions with bnb_bits, or None
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
                self._engine = None
                del old
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            cached_path = self._opt_cache_path(spec)
            if cached_path is not None:
                transformer = self._load_cached(cached_path, spec)
                if transformer is not None:
                    keep["transformer"] = transformer
            missing = [n for n in PART_NAMES if n not in keep]
            fresh = load_models(spec, offline=self.offline, parts=missing, progress=progress,
                                transformer_kwargs=self._transformer_kwargs(spec))
            bundle = ModelBundle(spec=spec, **keep, **{n: getattr(fresh, n) for n in missing})
            placement = Placement.choose(self.device, self.placement_override)
            self._engine = Engine(bundle, placement, outputs_dir=self.outputs_dir,
                                  decode_options=self.decode_options, async_decode=self.async_decode,
                                  speed=self.speed, fp8_storage=self.fp8_storage)
            if cached_path is not None and "transformer" in missing:
                from ..accel.opt_cache import save_optimized

                save_optimized(bundle.transformer, cached_path, self._opt_key(spec), self._opt_format())
            if self.speed is not None and self.speed.warmup:
                if progress is not None:
                    progress("Compiling the transformer (warm-up)")
                self._engine.warm_up()
            return self._engine

    def _transformer_kwargs(self, spec) -> dict | None:
        if self.bnb is None or not self.bnb.bnb_bits:
            return None
        from ..accel.quant import bnb_config, check_bnb_usable

        check_bnb_usable()
        log.info("Loading the transformer with bitsandbytes %d-bit weights", self.bnb.bnb_bits)
        return {"quantization_config": bnb_config(self.bnb.bnb_bits, self.bnb.bnb_double_quant,
                                                  spec.transformer.dtype or torch.bfloat16)}

    def _opt_format(self) -> str | None:
        """The converted format worth caching: FP8 or torchao integers (bitsandbytes quantizes while loading)."""
        s = self.speed
        if s is None:
            return None
        return "fp8" if s.fp8 else f"int{s.quant_bits}" if s.quant_bits else None

    def _fp8_options(self) -> dict:
        s = self.speed
        return {"target_keys": s.fp8_target_keys, "exclude_keys": s.fp8_exclude_keys,
                "use_scaled_mm": s.fp8_use_scaled_mm}

    def _opt_key(self, spec) -> str:
        from ..accel.opt_cache import cache_key

        fmt = self._opt_format()
        return cache_key(spec.transformer.repo, spec.transformer.dtype, fmt,
                         self._fp8_options() if fmt == "fp8" else {})

    def _opt_cache_path(self, spec):
        if not self.opt_cache or self._opt_format() is None:
            return None
        from ..accel.opt_cache import cache_path

        return cache_path(self.opt_cache, spec.name, self._opt_format(), self._opt_key(spec))

    def _load_cached(self, path, spec):
        from diffusers import HunyuanVideoFramepackTransformer3DModel

        from ..accel.opt_cache import load_optimized

        return load_optimized(HunyuanVideoFramepackTransformer3DModel, path, self._opt_key(spec),
                              spec.transformer.dtype, self._opt_format(), self._fp8_options())
