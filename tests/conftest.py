"""Shared fixtures: the tiny models are built once per test session into a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO.parent / "shared" / "fixtures" / "framepack-parity"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from diffusers_helper.tiny import ensure_tiny_models

    root = os.environ.get("FRAMEPACK_TEST_TINY_ROOT")  # reuse between local runs if set
    return ensure_tiny_models(Path(root) if root else tmp_path_factory.mktemp("cache") / "tiny-models")


@pytest.fixture(scope="session")
def tiny_bundles(tiny_root):
    from diffusers_helper.loading import load_models
    from diffusers_helper.tiny import tiny_spec

    return {name: load_models(tiny_spec(name, tiny_root)) for name in ("tiny", "tiny-f1")}


@pytest.fixture
def test_image() -> np.ndarray:
    """A smooth 96x128 RGB gradient with a bright square, deterministic."""
    y, x = np.mgrid[0:96, 0:128]
    img = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.uint8)
    img[30:60, 40:80] = 240
    return img


@pytest.fixture
def encoded_frames(monkeypatch):
    """Capture the frames handed to the MP4 encoder (x264's bitstream itself is not bit-reproducible)."""
    import diffusers_helper.engine as engine_module

    captured = {}
    real = engine_module.write_mp4

    def spy(frames, path, crf=16):
        captured[path.name] = frames.copy()
        return real(frames, path, crf=crf)

    monkeypatch.setattr(engine_module, "write_mp4", spy)
    return lambda final: captured[final.video_path.name]
