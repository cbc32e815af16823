"""MagCache: skip a step when the product of per-step residual magnitude ratios says it changes little.

Each step t has a ratio r_t = mean over tokens of |residual_t| / |residual_t-1|, calibrated once per model
(FramePack's published ratios ship with the app). After the first `retention` share of steps, skipped steps
accumulate ratio *= r_t and error += |1 - ratio|; a step is skipped while error < threshold and at most K steps
in a row are skipped, reusing the last computed residual. The rule needs nothing from the current step but its
index, so a skipped step reads no block's weights (streamed placement still brings in the first block).

diffusers has a MagCache hook too, but it has no off switch, keeps the calibration only until its last step
(then prints it) and counts steps itself across our per-section resets; the rule is a few lines over the
residual hooks TeaCache uses, so both caches share one tested skeleton.

Calibration (`magcache_calibrate`): nothing is skipped; each section's ratios (conditional branch) are
recorded and their mean over the job's sections is saved per model, bucket and step count under the cache
folder. Later jobs use calibrated ratios for that model when they exist, else the published ones, interpolated
to the step count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from .base import CacheContext, CacheSettings
from .base import context_name
from .residual import ResidualCache, ResidualState

log = logging.getLogger("framepack.magcache")
PUBLISHED = Path(__file__).with_name("magcache_ratios.json")


def interpolate(ratios: list[float], steps: int) -> list[float]:
    """Ratios calibrated for len(ratios) steps, resampled for `steps` over the same schedule fraction."""
    if len(ratios) == steps:
        return list(ratios)
    if steps == 1:
        return [ratios[0]]
    src = np.linspace(0.0, 1.0, len(ratios))
    return [float(x) for x in np.interp(np.linspace(0.0, 1.0, steps), src, np.asarray(ratios, dtype=float))]


def _nearest(table: dict, key: int) -> str:
    return min(table, key=lambda k: (abs(int(k) - key), int(k)))


def lookup(table: dict, resolution: int, steps: int) -> tuple[list[float], str]:
    """Ratios from a {bucket: {steps: ratios}} table for the nearest bucket and step count, resampled."""
    bucket = _nearest(table, resolution)
    calibrated = _nearest(table[bucket], steps)
    return interpolate(table[bucket][calibrated], steps), f"{bucket} bucket, {calibrated} steps"


def calibration_file(context: CacheContext) -> Path | None:
    if context.store is None or not context.model:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in context.model)
    return Path(context.store) / "magcache" / f"{safe}.json"


class MagCache(ResidualCache):
    name, hook_prefix = "magcache", "magcache"

    def __init__(self, transformer):
        super().__init__(transformer)
        self.threshold, self.max_skips, self.retention = 0.1, 2, 0.25
        self.calibrate = False
        self.context = CacheContext()
        self.ratios: list[float] = []
        self.source = ""
        self._recorded: list[list[float]] = []  # calibration: one list per section
        self._published = None

    def published(self) -> dict:
        if self._published is None:
            self._published = json.loads(PUBLISHED.read_text())["ratios"]
        return self._published

    def configure(self, settings: CacheSettings, context: CacheContext) -> str:
        if settings.magcache_threshold < 0 or settings.magcache_max_skips < 0:
            raise ValueError("MagCache threshold and max skips must be >= 0")
        self.threshold, self.max_skips = settings.magcache_threshold, settings.magcache_max_skips
        self.retention, self.calibrate, self.context = settings.magcache_retention, settings.magcache_calibrate, context
        self._recorded = []
        if self.calibrate:
            return "MagCache calibration (nothing skipped; ratios saved for this model)"
        return (f"MagCache, threshold {self.threshold:g}, K {self.max_skips}, retention {self.retention:g} "
                f"(ratios: {self._choose_ratios(context.steps)})")

    def _choose_ratios(self, steps: int) -> str:
        path = calibration_file(self.context)
        if path is not None and path.is_file():
            try:
                self.ratios, where = lookup(json.loads(path.read_text()), self.context.resolution, steps)
                self.source = f"calibrated for this model, {where}"
                return self.source
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("Ignoring unreadable MagCache calibration %s (%s)", path, exc)
        family = self.published().get(self.context.family, self.published()["Original"])
        self.ratios, where = lookup(family, self.context.resolution, steps)
        self.source = f"published FramePack{'-F1' if self.context.family == 'F1' else ''}, {where}"
        return self.source

    def decide(self, state: ResidualState, step: int, module, hidden_states, temb) -> bool:
        rule = state.rule
        if self.calibrate or step < int(self.retention * self.num_steps + 0.5) or step >= len(self.ratios):
            return True
        rule["ratio"] = rule.get("ratio", 1.0) * self.ratios[step]
        rule["skipped"] = rule.get("skipped", 0) + 1
        rule["error"] = rule.get("error", 0.0) + abs(1.0 - rule["ratio"])
        if state.residual is not None and rule["error"] < self.threshold and rule["skipped"] <= self.max_skips:
            return False
        rule["ratio"], rule["skipped"], rule["error"] = 1.0, 0, 0.0
        return True

    def computed(self, state: ResidualState, residual: torch.Tensor) -> None:
        if not self.calibrate or context_name(self.states) == "uncond":
            return
        ratios = state.rule.setdefault("calibration", [])
        if state.residual is None:
            ratios.append(1.0)
        else:
            now = torch.linalg.vector_norm(residual.float(), dim=-1)
            before = torch.linalg.vector_norm(state.residual.float(), dim=-1)
            ratios.append(float((now / (before + 1e-8)).mean()))

    def section_done(self) -> None:
        if not self.calibrate:
            return
        for name in ("cond", "cfg-batch"):
            state = self.states._state_cache.get(name)
            if state is not None and state.rule.get("calibration"):
                self._recorded.append(list(state.rule["calibration"]))
                break
        self._save()

    def _save(self) -> None:
        path = calibration_file(self.context)
        full = [r for r in self._recorded if len(r) == self.num_steps]
        if path is None or not full:
            return
        mean = [round(float(x), 5) for x in np.mean(np.asarray(full), axis=0)]
        table = {}
        if path.is_file():
            try:
                table = json.loads(path.read_text())
            except ValueError:
                table = {}
        table.setdefault(str(self.context.resolution), {})[str(self.num_steps)] = mean
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
        log.info("MagCache calibration: %d sections averaged, saved to %s", len(full), path)
