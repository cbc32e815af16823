"""How the app runs its jobs: a pool of workers on Ray when the settings and the machine call for one, else the
in-process worker. Each pool worker builds its own engine provider from the same settings (`worker_provider`)."""

from __future__ import annotations

import logging
from functools import partial

from ..config import Settings, weight_format
from .logs import configure_logging, enabled_libraries
from ..parallel.pool import PoolError  # noqa: F401 - what the app catches when the pool cannot start
from .startup import apply_runtime_flags, engine_provider, model_device_settings

log = logging.getLogger("framepack.startup")


def worker_provider(settings: Settings, **overrides):
    """What a pool worker does first, in its own process: the log and PyTorch switches, then its provider (its GPU
    is the one Ray made visible to it, so `device` auto picks it)."""
    configure_logging(settings.log_level, enabled_libraries(weight_format(settings)))
    for line in apply_runtime_flags(settings):
        log.debug("%s", line)
    return engine_provider(settings, **overrides)


def job_pool(settings: Settings, **kwargs):
    """The pool of workers the settings ask for, or None for the in-process worker; the log says which."""
    from ..parallel.pool import start_pool

    if settings.cp_gpus > 1 and settings.workers != 1:
        log.info("Job pool: context parallel takes the GPUs (--cp-gpus %d); one in-process worker", settings.cp_gpus)
        return None
    own = [role for role, device in model_device_settings(settings).items() if device]
    if own and settings.workers == 0 and not settings.ray_address:
        log.info("Job pool: %s placed on a GPU of its own; one in-process worker", ", ".join(own))
        return None
    return start_pool(partial(worker_provider, settings), settings.output_dir, settings.workers,
                      settings.ray_address, **kwargs)
