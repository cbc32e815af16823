"""One loading path for the real and the tiny models.

A `ModelSpec` says where each part lives (hub repo id or local folder), which class loads it and in
which dtype; this module turns it into live objects on the CPU. Everything that differs between the
real repos, a local mirror (FRAMEPACK_MODELS_DIR) and the offline tiny preset is in the spec, so the
code below has no special cases for them.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from . import specs as model_specs
from .specs import ModelSpec, PartSpec

logger = logging.getLogger("framepack.loading")

PART_NAMES = (
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "vae",
    "feature_extractor",
    "image_encoder",
)


@dataclass(frozen=True)
class _Loader:
    module: str
    attr: str
    dtype_kwarg: str | None  # transformers 5 takes `dtype=`, diffusers `torch_dtype=`; None: not a model
    config_file: str  # the file every copy of the part has; used to check the offline cache cheaply


# Spec class name -> what actually loads it (imported lazily: transformers/diffusers are slow to import).
_LOADERS: dict[str, _Loader] = {
    "HunyuanVideoFramepackTransformer3DModel": _Loader(
        "diffusers", "HunyuanVideoFramepackTransformer3DModel", "torch_dtype", "config.json"
    ),
    "AutoencoderKLHunyuanVideo": _Loader("diffusers", "AutoencoderKLHunyuanVideo", "torch_dtype", "config.json"),
    "LlamaModel": _Loader("transformers", "LlamaModel", "dtype", "config.json"),
    "CLIPTextModel": _Loader("transformers", "CLIPTextModel", "dtype", "config.json"),
    "SiglipVisionModel": _Loader("transformers", "SiglipVisionModel", "dtype", "config.json"),
    # In transformers 5 `LlamaTokenizerFast` is `LlamaTokenizer`, which rebuilds the backend with a
    # SentencePiece-style Metaspace pre-tokenizer and ignores the ByteLevel one in a Llama-3
    # tokenizer.json, so it would split text differently from the original. `PreTrainedTokenizerFast`
    # (= TokenizersBackend) uses tokenizer.json exactly as saved.
    "LlamaTokenizerFast": _Loader("transformers", "PreTrainedTokenizerFast", None, "tokenizer_config.json"),
    "PreTrainedTokenizerFast": _Loader("transformers", "PreTrainedTokenizerFast", None, "tokenizer_config.json"),
    "CLIPTokenizer": _Loader("transformers", "CLIPTokenizer", None, "tokenizer_config.json"),
    # transformers 5's `SiglipImageProcessor` needs torchvision and silently becomes the PIL variant
    # without it; always using the PIL one keeps preprocessing identical on every machine.
    "SiglipImageProcessor": _Loader("transformers", "SiglipImageProcessorPil", None, "preprocessor_config.json"),
    "SiglipImageProcessorPil": _Loader("transformers", "SiglipImageProcessorPil", None, "preprocessor_config.json"),
}

_FIX_HINT = "Run once with internet access, or point FRAMEPACK_MODELS_DIR at a folder laid out like the repos."


class WeightsMissingError(RuntimeError):
    """Weights that cannot be had; the message alone tells the user what to do (shown as-is in the UI)."""

    def __init__(self, message: str, repos: list[str] | None = None, offline: bool = False):
        super().__init__(message)
        self.repos = list(repos or [])
        self.offline = offline


@dataclass
class ModelBundle:
    """The loaded parts; a part not asked for is None."""

    spec: ModelSpec
    text_encoder: Any = None
    text_encoder_2: Any = None
    tokenizer: Any = None
    tokenizer_2: Any = None
    vae: Any = None
    feature_extractor: Any = None
    image_encoder: Any = None
    transformer: Any = None

    def models(self) -> dict[str, Any]:
        """Only the torch modules, for whoever places them on devices."""
        import torch

        out = {}
        for name in PART_NAMES:
            obj = getattr(self, name)
            if isinstance(obj, torch.nn.Module):
                out[name] = obj
        return out


def resolve_spec(model: str, models_dir: str | Path | None = None) -> ModelSpec:
    """Model name -> spec. `models_dir` (default: $FRAMEPACK_MODELS_DIR) replaces hub repos present there."""
    if model in ("tiny", "tiny-f1"):
        from .tiny import ensure_tiny_models, tiny_spec

        return tiny_spec(model, ensure_tiny_models())
    if model not in model_specs.MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; valid models: {', '.join(model_specs.MODEL_NAMES)}")
    spec = model_specs.real_spec(model)
    if models_dir is None:
        models_dir = os.environ.get("FRAMEPACK_MODELS_DIR") or None
    if models_dir is None:
        return spec
    base = Path(models_dir).expanduser()
    overrides = {}
    for name, part in spec.parts().items():
        folder = base / part.repo
        if folder.is_dir():
            overrides[name] = replace(part, repo=str(folder.resolve()))
    return replace(spec, **overrides) if overrides else spec


def _default_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


def _is_local(part: PartSpec) -> bool:
    return os.path.isdir(part.repo)


def _loader(part: PartSpec) -> _Loader:
    try:
        return _LOADERS[part.cls]
    except KeyError:
        raise ValueError(f"no loader for class {part.cls!r} (known: {', '.join(sorted(_LOADERS))})") from None


def _where(part: PartSpec) -> str:
    return f"{part.repo}/{part.subfolder}" if part.subfolder else part.repo


def _missing_from_cache(parts: dict[str, PartSpec], cache_dir: str | None) -> list[str]:
    """Hub repos with a part absent from the local cache, checked before any multi-GB load starts."""
    from huggingface_hub import try_to_load_from_cache

    missing: list[str] = []
    for part in parts.values():
        if _is_local(part) or part.repo in missing:
            continue
        filename = f"{part.subfolder}/{_loader(part).config_file}" if part.subfolder else _loader(part).config_file
        found = try_to_load_from_cache(part.repo, filename, cache_dir=cache_dir)
        if not isinstance(found, str):
            missing.append(part.repo)
    return missing


def _offline_message(repos: list[str]) -> str:
    return (
        f"Model weights for {', '.join(repos)} are not in the Hugging Face cache"
        f" and offline mode is on (HF_HUB_OFFLINE=1). {_FIX_HINT}"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _load_part(name: str, part: PartSpec, offline: bool, cache_dir: str | None, extra: dict | None = None):
    loader = _loader(part)
    cls = getattr(importlib.import_module(loader.module), loader.attr)
    local = _is_local(part)
    kwargs: dict[str, Any] = {"local_files_only": True if local else offline}
    if part.subfolder:
        kwargs["subfolder"] = part.subfolder
    if cache_dir is not None and not local:
        kwargs["cache_dir"] = cache_dir
    if loader.dtype_kwarg is not None and part.dtype is not None:
        kwargs[loader.dtype_kwarg] = part.dtype
    kwargs.update(extra or {})

    from huggingface_hub.errors import EntryNotFoundError

    try:
        obj = cls.from_pretrained(part.repo, **kwargs)
    except (OSError, EntryNotFoundError) as err:
        if local:
            raise WeightsMissingError(
                f"Model files for {name} are missing or incomplete in {_where(part)} ({_first_line(err)}). "
                "Rebuild the tiny models by deleting their folder, or lay FRAMEPACK_MODELS_DIR out like the repos.",
                [part.repo],
            ) from err
        if offline:
            raise WeightsMissingError(_offline_message([part.repo]), [part.repo], offline=True) from err
        raise WeightsMissingError(
            f"Could not get model weights for {_where(part)} from the Hugging Face hub ({_first_line(err)}). "
            f"Check the internet connection and free disk space. {_FIX_HINT}",
            [part.repo],
        ) from err

    if loader.dtype_kwarg is not None:
        obj.eval()
        obj.requires_grad_(False)
    logger.info(
        "%s: %s from %s%s, dtype %s",
        name,
        part.cls if part.cls == loader.attr else f"{part.cls} (as {loader.attr})",
        _where(part),
        " [local folder]" if local else (" [HF cache]" if offline else ""),
        str(part.dtype).removeprefix("torch.") if part.dtype is not None else "-",
    )
    return obj


def load_models(
    spec: ModelSpec,
    *,
    offline: bool | None = None,
    cache_dir: str | None = None,
    parts: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    transformer_kwargs: dict | None = None,
) -> ModelBundle:
    """Load the parts of `spec` (all by default) on the CPU, in eval mode with gradients off.

    `transformer_kwargs` go to the transformer's from_pretrained (a quantization config).
    `offline=None` follows HF_HUB_OFFLINE. Offline, all hub repos are checked against the cache first
    so a missing download is reported at once, naming every missing repo, not after loading 16 GB.
    """
    all_parts = spec.parts()
    wanted = list(PART_NAMES) if parts is None else list(parts)
    unknown = [p for p in wanted if p not in all_parts]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; valid parts: {', '.join(PART_NAMES)}")
    selected = {name: all_parts[name] for name in PART_NAMES if name in wanted}
    for part in selected.values():
        _loader(part)  # unknown class names fail before anything is loaded
    if offline is None:
        offline = _default_offline()

    if offline:
        missing = _missing_from_cache(selected, cache_dir)
        if missing:
            raise WeightsMissingError(_offline_message(missing), missing, offline=True)

    bundle = ModelBundle(spec=spec)
    for name, part in selected.items():
        if progress is not None:
            progress(f"Loading {name} ({part.cls})")
        extra = transformer_kwargs if name == "transformer" else None
        setattr(bundle, name, _load_part(name, part, offline, cache_dir, extra))
    return bundle
