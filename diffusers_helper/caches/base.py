"""The step-cache interface: what the engine, the placement and the block streamer know of a step cache.

A step cache decides, per denoising step, whether the transformer blocks run or their output is rebuilt from
what an earlier step computed. Its per-step state lives in diffusers `StateManager`s, one state per cache
context ("cond", "uncond", "cfg-batch": the sampler enters one per guidance branch), so real CFG never mixes the
two branches. Every registered cache is attached once per model (`StepCaches`), before placement and beneath
nothing but the compiled block forwards, and is off until a job picks it:

    caches.select(name, settings, context)   # per job: one cache on (or none), the others pass through
    caches.reset(num_steps)                  # per section (and before a retried section)
    caches.skipping()                        # inside a forward: are the blocks skipped this step?
    caches.note(steps), caches.record()      # computed / skipped steps, for the log, the UI and the sidecar
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..config.job import CACHE_LABELS, CACHE_NAMES, JobSettings


@dataclass(frozen=True)
class CacheSettings:
    """A job's step-cache controls: the fields of `config.job` that belong to caches, declared (with their
    defaults) only there."""

    cache: str
    teacache_threshold: float
    magcache_threshold: float
    magcache_max_skips: int
    magcache_retention: float
    magcache_calibrate: bool
    fbcache_threshold: float
    taylorseer_interval: int

    @classmethod
    def of(cls, job=None, **changes) -> "CacheSettings":
        """From a job (a request or the settings); without one, the declared defaults; `changes` override."""
        job = job if job is not None else JobSettings()
        return cls(**{name: changes.get(name, getattr(job, name)) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class CacheContext:
    """What a cache may need to know of the job beyond its settings (MagCache: which ratios apply)."""

    family: str = "Original"  # "Original" (inverted sampling) or "F1"
    resolution: int = 640  # the bucket resolution asked for
    model: str = ""  # names the loaded transformer, for calibrated data
    store: Path | None = None  # where a cache may keep calibrated data
    steps: int = 25  # the job's steps per section


class StepCache(ABC):
    """One cache's hooks on one transformer. Off (the default) they only pass through."""

    name: str = "cache"  # the registry name a job picks

    @property
    def label(self) -> str:
        """How the log and the UI name it (config.job.CACHE_LABELS)."""
        return CACHE_LABELS.get(self.name, self.name)

    def __init__(self) -> None:
        self.enabled = False
        self.stats = {"computed": 0, "skipped": 0}
        self.steps_computed: list[int] = []  # this section's computed step indices (first branch only)

    @abstractmethod
    def configure(self, settings: CacheSettings, context: CacheContext) -> str:
        """Per job, when picked: read its own settings; returns a one-line description for the log."""

    @abstractmethod
    def reset(self, num_steps: int) -> None:
        """Per section: forget every context's state and start counting steps again."""

    @abstractmethod
    def skipping(self) -> bool:
        """Inside a forward, once the first block has run: does this step skip the remaining blocks?"""

    def section_done(self) -> None:
        """After a section's last step (MagCache saves its calibration here)."""

    def count(self, step: int, computed: bool) -> None:
        self.stats["computed" if computed else "skipped"] += 1
        if computed:
            self.steps_computed.append(step)

    def clear_stats(self) -> None:
        self.stats["computed"] = self.stats["skipped"] = 0
        self.steps_computed = []


_agreement: Callable[[bool], bool] | None = None


def set_agreement(fn: Callable[[bool], bool] | None) -> None:
    """Context parallel ranks: `fn` turns one rank's compute-or-skip decision into the one every rank takes."""
    global _agreement
    _agreement = fn


def agree(compute: bool) -> bool:
    """A cache's decision for this step, the same on every rank (one rank: unchanged)."""
    return compute if _agreement is None else _agreement(compute)


def split_forward() -> bool:
    """Whether the blocks' outputs are split across context parallel ranks."""
    return _agreement is not None


# name -> attach(transformer) -> StepCache; `register_step_cache` adds one and makes it a job choice
STEP_CACHES: dict[str, Callable[[object], StepCache]] = {}


def register_step_cache(name: str, attach: Callable[[object], StepCache]) -> None:
    STEP_CACHES[name] = attach
    if name not in CACHE_NAMES:
        CACHE_NAMES.append(name)


def context_name(states) -> str:
    """The cache context a diffusers StateManager is in ("cond", "uncond", "cfg-batch"), "" outside one."""
    return getattr(states._context, "name", "")


def _builtin(module: str, cls: str) -> Callable[[object], StepCache]:
    def attach(transformer):
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), cls)(transformer)

    return attach


for _name, _module, _cls in (("teacache", "teacache", "TeaCache"), ("magcache", "magcache", "MagCache"),
                             ("fbcache", "fbcache", "FirstBlockCache"), ("taylorseer", "taylorseer", "TaylorSeer")):
    register_step_cache(_name, _builtin(_module, _cls))


@dataclass
class SectionCacheStats:
    computed: int
    skipped: int
    steps_computed: list[int] = field(default_factory=list)


class StepCaches:
    """Every registered cache attached to one transformer; a job turns one on. The engine's only handle."""

    def __init__(self, transformer, names: list[str] | None = None):
        self.caches: dict[str, StepCache] = {}
        for name in names if names is not None else list(STEP_CACHES):
            if name == "none":
                continue
            try:
                attach = STEP_CACHES[name]
            except KeyError:
                raise ValueError(f"unknown step cache {name!r}; one of {', '.join(STEP_CACHES)}") from None
            self.caches[name] = attach(transformer)
        self.active: StepCache | None = None
        self.settings = CacheSettings.of(cache="none")
        self.sections: list[SectionCacheStats] = []
        self.description = "off"

    @property
    def names(self) -> list[str]:
        return ["none", *self.caches]

    @property
    def enabled(self) -> bool:
        return self.active is not None and self.active.enabled

    def select(self, settings: CacheSettings, context: CacheContext | None = None) -> str:
        """Turn on the job's cache (or none); returns what the log says."""
        if settings.cache != "none" and settings.cache not in self.caches:
            raise ValueError(f"step cache {settings.cache!r} is not available here; one of {', '.join(self.names)}")
        for cache in self.caches.values():
            cache.enabled = False
        self.active, self.settings, self.sections = self.caches.get(settings.cache), settings, []
        if self.active is None:
            self.description = "off"
            return "Step cache: off (every step computes)"
        self.description = self.active.configure(settings, context or CacheContext())
        self.active.enabled = True
        return f"Step cache: {self.description}"

    def off(self) -> None:
        """After a job: every cache passes through again; the job's counts stay readable until the next one."""
        for cache in self.caches.values():
            cache.enabled = False

    def totals(self) -> dict:
        """Computed and skipped steps over the last job's sections."""
        return {"computed": sum(s.computed for s in self.sections), "skipped": sum(s.skipped for s in self.sections)}

    def reset(self, num_steps: int) -> None:
        for cache in self.caches.values():
            cache.reset(num_steps)
            cache.clear_stats()

    def skipping(self) -> bool:
        return self.enabled and self.active.skipping()

    def note(self) -> str:
        """After a section: one line for the UI and the log; the section's counts go into `record()`."""
        if not self.enabled:
            return ""
        self.active.section_done()
        s = self.active.stats
        self.sections.append(SectionCacheStats(s["computed"], s["skipped"], list(self.active.steps_computed)))
        return f"{self.active.label}: {s['computed']}/{s['computed'] + s['skipped']} steps computed"

    def record(self) -> dict:
        """For the sidecar: the cache, its settings and each section's computed / skipped steps."""
        if self.active is None:
            return {"name": "none"}
        prefix = self.active.name
        knobs = {k: v for k, v in asdict(self.settings).items() if k.startswith(prefix)}
        return {"name": self.active.name, "description": self.description, "settings": knobs,
                "sections": [asdict(s) for s in self.sections]}
