"""The step-cache interface: what the engine, the placement and the block streamer know of a step cache.

A step cache decides, per denoising step, whether the transformer blocks run or their output is rebuilt
from what an earlier step computed. Its per-step state lives in a diffusers `StateManager`, one state per
cache context ("cond", "uncond", "cfg-batch": the sampler enters one per guidance branch), so real CFG never
mixes the two branches; diffusers' own cache hooks (first-block cache, MagCache, TaylorSeer) keep their state
the same way, which is how they fit behind this interface. The engine:

    cache.configure(enabled, threshold)   # per job
    cache.reset(num_steps)                # per section (and before a retried section)
    cache.skipping()                      # inside a forward: are the blocks skipped this step?
    cache.stats, cache.note(steps)        # computed / skipped steps, for the log, the UI and the sidecar
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable


class StepCache(ABC):
    name: str = "cache"

    def __init__(self) -> None:
        self.stats = {"computed": 0, "skipped": 0}

    @property
    @abstractmethod
    def enabled(self) -> bool:
        """Whether this job uses the cache (off: every step computes, the hooks only pass through)."""

    @abstractmethod
    def configure(self, enabled: bool, threshold: float = 0.0) -> None:
        """Per job: on or off, and the threshold of its skip rule."""

    @abstractmethod
    def reset(self, num_steps: int) -> None:
        """Per section: forget every context's state, start counting steps again."""

    @abstractmethod
    def skipping(self) -> bool:
        """Inside a forward: whether this step reuses cached output instead of running the blocks."""

    def note(self, steps: int) -> str:
        """One line for the UI and the log, about the section just sampled."""
        return f"{self.name}: {self.stats['computed']}/{steps} steps computed" if self.enabled else ""


class NoStepCache(StepCache):
    """Every step computes, whatever a job asks for (a transformer prepared without a cache)."""

    name = "none"

    @property
    def enabled(self) -> bool:
        return False

    def configure(self, enabled: bool, threshold: float = 0.0) -> None:
        pass

    def reset(self, num_steps: int) -> None:
        self.stats["computed"] = self.stats["skipped"] = 0

    def skipping(self) -> bool:
        return False


def _teacache(transformer) -> StepCache:
    from .teacache import TeaCache

    return TeaCache(transformer)


# name -> attach(transformer): `prepare_transformer` attaches a cache once per model; jobs configure it
STEP_CACHES: dict[str, Callable[[object], StepCache]] = {"teacache": _teacache, "none": lambda t: NoStepCache()}


def attach_step_cache(transformer, name: str) -> StepCache:
    try:
        attach = STEP_CACHES[name]
    except KeyError:
        raise ValueError(f"unknown step cache {name!r}; one of {', '.join(STEP_CACHES)}") from None
    return attach(transformer)
