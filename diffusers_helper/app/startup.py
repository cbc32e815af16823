"""What every entry point does first: settings, logging, compatibility check, runtime flags.

The log says what was decided, so users can see which optimizations are active.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping

from .compat import SystemInfo, check, report
from ..config import LoadedSettings, Settings, SettingsError, load_settings, torch_sdp_flag, weight_format
from .access import credentials
from .logs import configure_logging, enabled_libraries

log = logging.getLogger("framepack.startup")


def apply_runtime_flags(settings: Settings, env: Mapping[str, str] | None = None) -> list[str]:
    """Process-wide PyTorch switches; returns one line per decision for the log."""
    import torch

    env = os.environ if env is None else env
    lines = []
    torch.backends.cuda.matmul.allow_tf32 = settings.tf32
    torch.backends.cudnn.allow_tf32 = settings.tf32
    lines.append(f"TF32 matmuls {'on' if settings.tf32 else 'off'}")
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    lines.append(f"cudnn.benchmark {'on' if settings.cudnn_benchmark else 'off'}")
    flash = torch_sdp_flag(env, "PYTORCH_ENABLE_FLASH_SDP")
    if flash is not None:
        torch.backends.cuda.enable_flash_sdp(flash)
        lines.append(f"PyTorch SDPA flash kernel {'on' if flash else 'off'} (PYTORCH_ENABLE_FLASH_SDP)")
    mem = torch_sdp_flag(env, "PYTORCH_ENABLE_MEM_EFFICIENT_SDP")
    if mem is not None:
        torch.backends.cuda.enable_mem_efficient_sdp(mem)
        lines.append(f"PyTorch SDPA memory-efficient kernel {'on' if mem else 'off'} "
                     "(PYTORCH_ENABLE_MEM_EFFICIENT_SDP)")
    if env.get("PYTORCH_CUDA_ALLOC_CONF"):
        lines.append(f"CUDA allocator: {env['PYTORCH_CUDA_ALLOC_CONF']}")
    return lines


def placement_override(settings: Settings) -> str | None:
    """The placement the settings force, or None to choose from free VRAM."""
    if settings.placement != "auto":
        return settings.placement
    if settings.keep_models_in_gpu:
        return "full"
    if settings.stream_transformer:
        return "swap"
    return None


def decode_options(settings: Settings):
    from ..vae.plan import DecodeOptions

    backend = "tensorrt" if settings.enable_tensorrt else settings.vae_backend
    return DecodeOptions(chunk_size=settings.vae_chunk_size, reserve_gb=settings.vae_chunk_reserve_gb,
                         safety=settings.vae_chunk_safety, backend=backend,
                         chunk_multiplier=settings.chunk_size_multiplier, upscale_factor=settings.vae_upscale_factor,
                         max_attention_tokens=settings.vae_attention_tokens,
                         tensorrt_cache_dir=settings.tensorrt_cache_dir, trt_workspace_mb=settings.trt_workspace_mb,
                         trt_max_aux_streams=settings.trt_max_aux_streams,
                         trt_max_cached_shapes=settings.trt_max_cached_shapes)


def transformer_plan(settings: Settings):
    """What prepare_transformer does to the transformer: weight format, step cache, compile, attention."""
    from ..accel.attention import AttentionConfig
    from ..accel.compile import CompileConfig
    from ..accel.context_parallel import ContextParallel
    from ..config.formats import WeightFormat
    from ..pipeline.prepare import TransformerPlan

    s = settings
    return TransformerPlan(weights=WeightFormat.from_settings(s), cache_store=s.cache_dir,
                           compile=CompileConfig(enabled=s.enable_compile, mode=s.compile_mode, cache_dir=s.cache_dir,
                                                 module_cache=s.enable_module_cache, warmup=not s.fast_start),
                           attention=AttentionConfig(backend=s.attention_backend, xformers_mode=s.xformers_mode),
                           context_parallel=ContextParallel(s.cp_gpus, s.cp_attention))


def model_device_settings(settings: Settings) -> dict[str, str]:
    """The models the settings give a device of their own (a second GPU), by role."""
    s = settings
    return {"vae": s.vae_device, "text_encoder": s.text_encoder_device, "image_encoder": s.image_encoder_device}


def engine_provider(settings: Settings, **overrides):
    """The EngineProvider the settings describe; the CLI overrides a few values with its own flags."""
    from .service import EngineProvider

    s = settings
    kwargs = dict(models_dir=s.models_dir or None, offline=True if (s.offline or s.tiny) else None,
                  device=device_arg(s), outputs_dir=s.output_dir, placement=placement_override(s),
                  decode_options=decode_options(s), async_decode=s.async_decode, plan=transformer_plan(s),
                  opt_cache=s.optimized_transformer if s.enable_opt_cache and not s.fast_start else None,
                  devices=model_device_settings(s), lora_dir=s.lora_dir)
    kwargs.update(overrides)
    provider = EngineProvider(**kwargs)
    if s.cp_gpus > 1:
        import torch.distributed as dist

        if not dist.is_initialized():  # the app: start the other ranks (torchrun and those ranks already joined)
            from ..parallel.group import RankProvider

            return RankProvider(provider, engine_provider, settings, s.cp_gpus)
    return provider


def device_arg(settings: Settings) -> str | None:
    return None if settings.device == "auto" else settings.device


def model_name(settings: Settings) -> str:
    if settings.tiny and not settings.model.startswith("tiny"):
        return "tiny-f1" if settings.model == "f1" else "tiny"
    return settings.model


def output_dir_problem(path: str) -> str | None:
    """Why videos cannot be written to `path`, or None; a missing folder is fine if it can be created (the first
    job creates it), so nothing is made before a job runs."""
    from pathlib import Path

    folder = Path(path).absolute()
    if folder.exists() and not folder.is_dir():
        return f"the output folder {path!r} is a file; choose a folder"
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"the output folder {path!r} cannot be created: {existing.name!r} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"the output folder {path!r} is not writable"
    return None


def server_problem(host: str) -> str | None:
    """Why the web app cannot bind to `host`, or None (checked before anything loads)."""
    import socket

    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return f"the server address {host!r} is not a host name or IP address of this machine (FRAMEPACK_SERVER or " \
               "--server)"
    return None


def credentials_problem(settings: Settings) -> str | None:
    """Why the sign-in settings cannot be used, or None."""
    try:
        credentials(settings.auth, settings.auth_file)
    except SettingsError as exc:
        return str(exc)
    return None


def start(argv: list[str] | None = None, *, info: SystemInfo | None = None, sleep=None) -> LoadedSettings:
    """Load and check settings; on a bad value print one line and exit with code 2."""
    try:
        loaded = load_settings(sys.argv[1:] if argv is None else argv)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    s = loaded.settings
    problem = credentials_problem(s) or output_dir_problem(s.output_dir) or server_problem(s.server)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    configure_logging(s.log_level, enabled_libraries(weight_format(s)))
    for warning in loaded.warnings:
        log.warning("%s", warning)
    if loaded.explicitly_set("cache_dir"):
        os.environ["FRAMEPACK_CACHE_DIR"] = s.cache_dir  # where tiny.py looks
    if s.offline or s.tiny:
        os.environ["HF_HUB_OFFLINE"] = "1"
    findings = check(s, info or SystemInfo.detect())
    kwargs = {} if sleep is None else {"sleep": sleep}
    report(findings, skip_wait=s.skip_compat_wait, **kwargs)
    for line in apply_runtime_flags(s):
        log.info("%s", line)
    if s.cache != "none":
        log.info("Step cache by default: %s (each job can pick another or none)", s.cache)
    override = placement_override(s)
    if override:
        log.info("Placement forced to %s by settings", override)
    return loaded
