"""FramePack's section schedules: which history frames condition each section and where results go.

Two modes, as in the original section loop:
- inverted anti-drifting (FramePackI2V_HY): sections are generated from the end of the video backwards;
  new latents are prepended to the history and the last section prepends the start latent.
- f1 (forward "vanilla"): sections are generated in time order and appended to the history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HISTORY_SIZES = (1, 2, 16)  # 1x, 2x and 4x compressed context frames


def section_count(seconds: float, window: int, fps: int = 30) -> int:
    return int(max(round(seconds * fps / (window * 4)), 1))


def frame_count(sections: int, window: int) -> int:
    """Frames in the final video: every section adds window*4 frames, plus the start frame."""
    return sections * window * 4 + 1


def inverted_paddings(sections: int) -> list[int]:
    if sections > 4:
        return [3] + [2] * (sections - 3) + [1, 0]
    return list(reversed(range(sections)))


@dataclass
class SectionInputs:
    """Transformer keyword arguments for one section (diffusers' names), on the CPU in float32."""

    indices_latents: torch.Tensor
    latents_clean: torch.Tensor
    indices_latents_clean: torch.Tensor
    latents_history_2x: torch.Tensor
    indices_latents_history_2x: torch.Tensor
    latents_history_4x: torch.Tensor
    indices_latents_history_4x: torch.Tensor

    def to_kwargs(self, device, dtype) -> dict:
        out = {}
        for name, value in vars(self).items():
            out[name] = value.to(device) if name.startswith("indices") else value.to(device=device, dtype=dtype)
        return out


class SectionSchedule:
    """Holds the latent history and produces each section's conditioning in generation order."""

    def __init__(self, mode: str, start_latent: torch.Tensor, sections: int, window: int):
        if mode not in ("inverted", "f1"):
            raise ValueError(f"unknown sampling mode {mode!r}")
        self.mode = mode
        self.start_latent = start_latent.float().cpu()
        self.sections = sections
        self.window = window
        self.targets: dict = {}  # time index -> (latent, strength, what): see set_targets
        self.extending = False
        b, c, _, h, w = start_latent.shape
        zeros = torch.zeros((b, c, sum(HISTORY_SIZES), h, w), dtype=torch.float32)
        if mode == "inverted":
            self.history = zeros
            self.paddings = inverted_paddings(sections)
            self.generated_frames = 0
        else:
            self.history = torch.cat([zeros, self.start_latent], dim=2)
            self.generated_frames = 1

    def is_last(self, k: int) -> bool:
        return k == self.sections - 1

    def set_targets(self, end_latent: torch.Tensor | None, keyframes: list, section_s: float, strength: float) -> dict:
        """Steer sections toward images: the end image ends the last section, a keyframe at t seconds ends the
        section whose end is nearest t. A target is mixed into that section's first clean "after" frame with
        `strength` (the first-last-frame forks' recipe: the end latent replaces the empty history there).
        Returns {section number in time order: what ends it}, for the sidecar."""
        targets: dict[int, tuple[torch.Tensor, float, str]] = {}
        if (end_latent is not None or keyframes) and self.mode != "inverted":
            raise ValueError("the F1 model generates forward and cannot aim at an end image or keyframes; choose "
                             "the FramePack model, or remove them")
        if end_latent is not None:
            targets[self.sections - 1] = (end_latent.float().cpu(), strength, "end image")
        for seconds, latent in keyframes:
            if not 0 < seconds <= self.sections * section_s:
                raise ValueError(f"a keyframe at {seconds:g}s is outside the video "
                                 f"(0 to {self.sections * section_s:g}s)")
            i = min(self.sections - 1, max(0, round(seconds / section_s) - 1))
            if i in targets:
                raise ValueError(f"the keyframe at {seconds:g}s ends the same section as the {targets[i][2]}; "
                                 f"keyframes need at least {section_s:g}s between them")
            targets[i] = (latent.float().cpu(), strength, f"keyframe at {seconds:g}s")
        self.targets = targets
        return {i + 1: f"{name}, ending at {(i + 1) * section_s:g}s" for i, (_, _, name) in sorted(targets.items())}

    def continue_from(self, latents: torch.Tensor | None) -> None:
        """Extend a video (F1): its last latent frames become the history, so section 0 continues from them and is
        decoded with them like any later section (blended into the video's last frames)."""
        if latents is None:
            return
        if self.mode != "f1":
            raise ValueError("extending a video continues it forward: choose the F1 model")
        if latents.shape[2] < self.window + 1:
            raise ValueError(f"the video is too short to extend: at least {4 * self.window + 1} frames are needed")
        zeros = torch.zeros_like(self.history[:, :, : sum(HISTORY_SIZES)])
        self.history = torch.cat([zeros, latents.float().cpu()], dim=2)
        self.generated_frames = latents.shape[2]
        self.extending = True

    def time_index(self, k: int) -> int:
        """Where the k-th generated section sits in the video (inverted sections are generated last-first)."""
        return self.sections - 1 - k if self.mode == "inverted" else k

    def inputs(self, k: int) -> SectionInputs:
        n1, n2, n4 = HISTORY_SIZES
        w = self.window
        if self.mode == "inverted":
            pad = self.paddings[k] * w
            idx = torch.arange(1 + pad + w + n1 + n2 + n4)
            pre, _blank, latent, post, i2x, i4x = idx.split([1, pad, w, n1, n2, n4])
            post_lat, lat_2x, lat_4x = self.history[:, :, : n1 + n2 + n4].split([n1, n2, n4], dim=2)
            target = self.targets.get(self.time_index(k))
            if target is not None:
                aim, strength, _ = target
                post_lat = post_lat * (1 - strength) + aim * strength
            clean = torch.cat([self.start_latent, post_lat], dim=2)
            clean_idx = torch.cat([pre, post])
        else:
            idx = torch.arange(1 + n4 + n2 + n1 + w)
            pre, i4x, i2x, i1x, latent = idx.split([1, n4, n2, n1, w])
            lat_4x, lat_2x, lat_1x = self.history[:, :, -(n4 + n2 + n1):].split([n4, n2, n1], dim=2)
            clean = torch.cat([self.start_latent, lat_1x], dim=2)
            clean_idx = torch.cat([pre, i1x])
        return SectionInputs(latent, clean, clean_idx, lat_2x, i2x, lat_4x, i4x)

    def add(self, k: int, generated: torch.Tensor) -> None:
        """Store a section's sampled latents in the history."""
        generated = generated.float().cpu()
        if self.mode == "inverted":
            if self.is_last(k):
                generated = torch.cat([self.start_latent, generated], dim=2)
            self.history = torch.cat([generated, self.history], dim=2)
        else:
            self.history = torch.cat([self.history, generated], dim=2)
        self.generated_frames += generated.shape[2]

    @property
    def video_latents(self) -> torch.Tensor:
        """The generated history in time order (what the video is decoded from)."""
        if self.mode == "inverted":
            return self.history[:, :, : self.generated_frames]
        return self.history[:, :, -self.generated_frames:]

    def newest_latents(self, k: int) -> torch.Tensor:
        """Latents to decode after section k: everything so far after the first section, then only
        the newest part the video needs (the rest is cross-faded from what was decoded before)."""
        lat = self.video_latents
        if k == 0 and not self.extending:
            return lat
        if self.mode == "inverted":
            n = self.window * 2 + (1 if self.is_last(k) else 0)
            return lat[:, :, :n]
        return lat[:, :, -self.window * 2:]

    @property
    def overlap_frames(self) -> int:
        return self.window * 4 - 3
