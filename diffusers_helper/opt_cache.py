"""Optimized-transformer cache (FRAMEPACK_ENABLE_OPT_CACHE): save the FP8-converted transformer once,
then load it directly, without reading the 26 GB bf16 checkpoint or converting it again.

The file is safetensors (float8 tensors included) with a JSON header naming the model config and the
conversion options; a file made for other options or another model is not used.
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


def cache_key(source: str, dtype: torch.dtype, fp8_target_keys, fp8_exclude_keys, use_scaled_mm: bool) -> str:
    """What the cached file was made from: the transformer's repo or folder, its dtype, the options."""
    blob = json.dumps({"format": FORMAT, "source": source, "dtype": str(dtype), "target": list(fp8_target_keys),
                       "exclude": list(fp8_exclude_keys), "scaled_mm": use_scaled_mm}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(setting: str | Path, model: str, key: str) -> Path:
    """A folder setting gets one file per model and options; a file setting is used as given."""
    path = Path(setting)
    return path / f"{model}-fp8-{key}.safetensors" if path.suffix == "" else path


def save_optimized(transformer, path: str | Path, key: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    state = {k: v.contiguous() for k, v in transformer.state_dict().items()}
    save_file(state, str(tmp), metadata={"framepack_key": key, "config": json.dumps(dict(transformer.config),
                                                                                   default=str)})
    os.replace(tmp, path)
    log.info("Saved optimized transformer weights to %s", path)
    return path


def load_optimized(cls, path: str | Path, key: str, fp8_target_keys, fp8_exclude_keys, use_scaled_mm: bool,
                   dtype: torch.dtype):
    """The cached transformer, or None when there is no usable file (missing, other options, broken)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("framepack_key") != key:
                log.info("Optimized transformer cache %s was made with other options; rebuilding it", path)
                return None
            config = json.loads(meta["config"])
            with torch.device("meta"):
                model = cls.from_config(config)
            model.to(dtype)
            convert_to_fp8(model, fp8_target_keys, fp8_exclude_keys, use_scaled_mm)
            state = {k: f.get_tensor(k) for k in f.keys()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            log.warning("Optimized transformer cache %s does not match the model (%d missing, %d unexpected); "
                        "rebuilding it", path, len(missing), len(unexpected))
            return None
    except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt, never fatal
        log.warning("Optimized transformer cache %s unreadable (%s); rebuilding it", path, exc.__class__.__name__)
        return None
    model.eval().requires_grad_(False)
    model._framepack_fp8 = True
    log.info("Loaded optimized transformer weights from %s", path)
    return model
