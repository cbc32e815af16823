"""Optional TensorRT tile decoder (torch-tensorrt), with a per-shape engine cache and a safe fallback.

An engine is built once per tile shape (batch, channels, frames, height, width, dtype), under a lock
so two jobs never build the same engine twice, and saved to the cache folder for the next launch. Any
error (torch-tensorrt missing, a build failure, a runtime failure) is logged once and that shape, or
everything if the import failed, goes back to the exact PyTorch decoder for good.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("framepack.vae")

TileFn = Callable[[torch.Tensor], torch.Tensor]
Key = tuple


def _shape_key(z: torch.Tensor) -> Key:
    return (*z.shape, str(z.dtype).removeprefix("torch."))


def build_tensorrt_engine(module: torch.nn.Module, example: torch.Tensor, workspace_mb: int,
                          aux_streams: int, cache_path: Path) -> TileFn:
    """Compile (or load from cache) a TensorRT engine for one input shape."""
    import torch_tensorrt

    if cache_path.is_file():
        loaded = torch_tensorrt.load(str(cache_path)).module()
        log.info("Loaded TensorRT VAE engine from %s", cache_path)
        return loaded
    compiled = torch_tensorrt.compile(module, ir="dynamo", inputs=[example], enabled_precisions={example.dtype},
                                      workspace_size=workspace_mb * 1024**2, max_aux_streams=aux_streams,
                                      min_block_size=1)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".partial")
    torch_tensorrt.save(compiled, str(tmp), inputs=[example])
    tmp.replace(cache_path)
    log.info("Built TensorRT VAE engine %s", cache_path.name)
    return compiled


class _TileModule(torch.nn.Module):
    """post_quant_conv + decoder as one module, the unit TensorRT compiles."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


class TensorRTTileDecoder:
    def __init__(self, vae, fallback: TileFn, cache_dir: str | Path = "cache/trt_cache", workspace_mb: int = 4096,
                 aux_streams: int = 2, max_cached_shapes: int = 8, build: Callable[..., TileFn] | None = None):
        self.vae = vae
        self.fallback = fallback
        self.cache_dir = Path(cache_dir)
        self.workspace_mb = workspace_mb
        self.aux_streams = aux_streams
        self.max_cached_shapes = max_cached_shapes
        self.build = build or build_tensorrt_engine
        self.engines: dict[Key, TileFn] = {}
        self.failed: set[Key] = set()
        self.disabled_reason: str | None = None
        self._locks: dict[Key, threading.Lock] = {}
        self._guard = threading.Lock()
        self.stats = {"tensorrt": 0, "fallback": 0}
        if build is None:
            try:
                import torch_tensorrt  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - any import problem means: not available
                self.disabled_reason = f"torch-tensorrt unavailable ({exc.__class__.__name__}: {exc})"
                log.warning("TensorRT VAE decoder off: %s; using the exact PyTorch decoder", self.disabled_reason)
        if self.disabled_reason is None:
            log.info("TensorRT VAE decoder enabled (workspace=%d MB).", workspace_mb)

    def _lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _engine(self, z: torch.Tensor) -> TileFn | None:
        key = _shape_key(z)
        if self.disabled_reason or key in self.failed:
            return None
        if key in self.engines:
            return self.engines[key]
        with self._lock(key):
            if key in self.engines:
                return self.engines[key]
            if key in self.failed:
                return None
            if len(self.engines) >= self.max_cached_shapes:
                oldest = next(iter(self.engines))
                del self.engines[oldest]
            name = "vae_" + "x".join(str(k) for k in key) + ".ep"
            try:
                engine = self.build(_TileModule(self.vae), z, self.workspace_mb, self.aux_streams,
                                    self.cache_dir / name)
            except Exception as exc:  # noqa: BLE001 - every failure falls back
                self.failed.add(key)
                log.warning("TensorRT engine build failed for tile %s (%s: %s); using the PyTorch decoder",
                            key, exc.__class__.__name__, str(exc).splitlines()[0] if str(exc) else "")
                return None
            self.engines[key] = engine
            return engine

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        engine = self._engine(z)
        if engine is not None:
            try:
                out = engine(z)
                self.stats["tensorrt"] += 1
                return out
            except Exception as exc:  # noqa: BLE001
                key = _shape_key(z)
                self.failed.add(key)
                self.engines.pop(key, None)
                log.warning("TensorRT decode failed for tile %s (%s); using the PyTorch decoder from now on",
                            key, exc.__class__.__name__)
        self.stats["fallback"] += 1
        return self.fallback(z)
