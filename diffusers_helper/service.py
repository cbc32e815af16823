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

from .engine import Engine
from .loading import PART_NAMES, ModelBundle, load_models, resolve_spec
from .placement import Placement, pick_device

log = logging.getLogger("framepack.service")


class EngineProvider:
    def __init__(self, *, models_dir: str | None = None, offline: bool | None = None, device: str | None = None,
                 outputs_dir: str | Path = "outputs", placement: str | None = None, decode_options=None,
                 async_decode: str = "auto", speed=None, fp8_storage: bool = False):
        self.models_dir = models_dir
        self.offline = offline
        self.device = pick_device(device)
        self.outputs_dir = Path(outputs_dir).resolve()  # absolute: API users get usable paths
        self.placement_override = placement
        self.decode_options = decode_options
        self.async_decode = async_decode
        self.speed = speed
        self.fp8_storage = fp8_storage
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
            missing = [n for n in PART_NAMES if n not in keep]
            fresh = load_models(spec, offline=self.offline, parts=missing, progress=progress)
            bundle = ModelBundle(spec=spec, **keep, **{n: getattr(fresh, n) for n in missing})
            placement = Placement.choose(self.device, self.placement_override)
            self._engine = Engine(bundle, placement, outputs_dir=self.outputs_dir,
                                  decode_options=self.decode_options, async_decode=self.async_decode,
                                  speed=self.speed, fp8_storage=self.fp8_storage)
            return self._engine
