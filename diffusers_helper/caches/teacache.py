"""TeaCache for the FramePack transformer, as the original app does it.

At each step the first dual block's modulated input is compared with the previous step's (relative L1,
rescaled by a fitted polynomial and accumulated). While the sum stays under the threshold, all transformer
blocks are skipped and the residual they added last time is reused. The first and last step of a section
always compute.
"""

from __future__ import annotations

import numpy as np

from .base import CacheContext, CacheSettings
from .residual import ResidualCache, ResidualState

# the polynomial FramePack's TeaCache fitted for HunyuanVideo: relative L1 of the modulated input -> output change
RESCALE = np.poly1d([7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02])


class TeaCache(ResidualCache):
    name, hook_prefix = "teacache", "teacache"

    def __init__(self, transformer):
        super().__init__(transformer)
        self.threshold = 0.15

    def configure(self, settings: CacheSettings, context: CacheContext) -> str:
        if settings.teacache_threshold < 0:
            raise ValueError(f"TeaCache threshold must be >= 0, got {settings.teacache_threshold}")
        self.threshold = settings.teacache_threshold
        return f"TeaCache, threshold {self.threshold:g}"

    def decide(self, state: ResidualState, step: int, module, hidden_states, temb) -> bool:
        modulated = module.norm1(hidden_states, emb=temb)[0]
        prev = state.rule.get("modulated")
        state.rule["modulated"] = modulated
        if prev is None or step == 0 or step == self.num_steps - 1 or state.residual is None:
            state.rule["accumulated"] = 0.0
            return True
        rel = ((modulated - prev).abs().mean() / prev.abs().mean()).item()
        state.rule["accumulated"] = state.rule.get("accumulated", 0.0) + float(RESCALE(rel))
        if state.rule["accumulated"] >= self.threshold:
            state.rule["accumulated"] = 0.0
            return True
        return False
