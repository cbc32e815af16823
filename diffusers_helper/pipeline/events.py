"""Typed events a generation job emits; the CLI and the UI both consume these and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Stage:
    """A phase change the user should see ("Encoding prompt", "Decoding section 2/3")."""

    message: str


@dataclass(frozen=True)
class StepProgress:
    section: int  # 1-based
    sections: int
    step: int  # 1-based
    steps: int
    preview: np.ndarray | None  # uint8 HxWx3 latent preview
    elapsed_s: float

    @property
    def fraction(self) -> float:
        """Progress over the whole job, for a single progress bar."""
        return ((self.section - 1) + self.step / self.steps) / self.sections


@dataclass(frozen=True)
class SectionFinished:
    section: int
    sections: int
    video_path: Path  # the whole video so far
    frames: int
    elapsed_s: float
    cache_note: str = ""  # e.g. "TeaCache: 14/25 steps computed"


@dataclass(frozen=True)
class Finished:
    video_path: Path
    sidecar_path: Path
    frames: int
    elapsed_s: float


@dataclass(frozen=True)
class Failed:
    error: str  # one line for the user; the traceback goes to the log
    video_path: Path | None  # the last complete video, if any section finished
    sidecar_path: Path | None


def one_line(exc: BaseException) -> str:
    """An unexpected error as the one line a user sees: its type and the first line of its message."""
    return f"{exc.__class__.__name__}: {exc}".splitlines()[0]


@dataclass(frozen=True)
class Cancelled:
    video_path: Path | None
    sidecar_path: Path | None


Event = Stage | StepProgress | SectionFinished | Finished | Failed | Cancelled
TERMINAL = (Finished, Failed, Cancelled)
