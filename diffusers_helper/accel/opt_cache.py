"""Optimized-transformer cache (FRAMEPACK_ENABLE_OPT_CACHE): save the FP8- or torchao-quantized
transformer once, then load it directly, without reading the 26 GB bf16 checkpoint or converting it
again.

FP8 goes to safetensors (float8 tensors included) with a JSON header naming the model config and the
conversion options. torchao's weights are tensor subclasses, which safetensors cannot hold, so they
go through torch.save and come back with torch.load(weights_only=True): torchao registers its
classes as safe to load, and nothing else in the file is unpickled. A file made for other options or
another model is not used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .fp8 import convert_to_fp8

log = logging.getLogger("framepack.opt_cache")
FORMAT = 1


def cache_key(source: str, dtype: torch.dtype, fmt: str, options: dict) -> str:
    """What the cached file was made from: the transformer's repo or folder, its dtype, the format and options."""
    blob = json.dumps({"format": FORMAT, "source": source, "dtype": str(dtype), "weights": fmt, **options},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(setting: str | Path, model: str, fmt: str, key: str) -> Path:
    """A folder setting gets one file per model, format and options; a file setting is used as given."""
    path = Path(setting)
    suffix = ".safetensors" if fmt == "fp8" else ".pt"
    return path / f"{model}-{fmt}-{key}{suffix}" if path.suffix == "" else path


def _config(transformer) -> str:
    return json.dumps(dict(transformer.config), default=str)


def save_optimized(transformer, path: str | Path, key: str, fmt: str = "fp8") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    if fmt == "fp8":
        state = {k: v.contiguous() for k, v in transformer.state_dict().items()}
        save_file(state, str(tmp), metadata={"framepack_key": key, "config": _config(transformer)})
    else:
        torch.save({"framepack_key": key, "config": _config(transformer), "state": transformer.state_dict()}, tmp)
    os.replace(tmp, path)
    log.info("Saved optimized transformer weights to %s", path)
    return path


def _read(path: Path, key: str, fmt: str):
    """(model config, state dict), or None when the file was made with other options."""
    if fmt != "fp8":
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if blob.get("framepack_key") != key:
            return None
        return json.loads(blob["config"]), blob["state"]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("framepack_key") != key:
            return None
        return json.loads(meta["config"]), {k: f.get_tensor(k) for k in f.keys()}


def load_optimized(cls, path: str | Path, key: str, dtype: torch.dtype, fmt: str = "fp8", fp8_options=None):
    """The cached transformer, or None when there is no usable file (missing, other options, broken)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        read = _read(path, key, fmt)
        if read is None:
            log.info("Optimized transformer cache %s was made with other options; rebuilding it", path)
            return None
        config, state = read
        with torch.device("meta"):
            model = cls.from_config(config)
        model.to(dtype)
        if fmt == "fp8":  # the FP8 file holds plain tensors: the empty model needs its FP8 modules to assign them to
            convert_to_fp8(model, **(fp8_options or {}))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            log.warning("Optimized transformer cache %s does not match the model (%d missing, %d unexpected); "
                        "rebuilding it", path, len(missing), len(unexpected))
            return None
    except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt, never fatal
        log.warning("Optimized transformer cache %s unreadable (%s); rebuilding it", path, exc.__class__.__name__)
        return None
    model.eval().requires_grad_(False)
    log.info("Loaded optimized transformer weights from %s", path)
    return model
