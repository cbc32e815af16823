"""Shared fixtures: the tiny models are built once per test session into a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO.parent / "shared" / "fixtures" / "framepack-parity"


class FakeModel(torch.nn.Module):
    """Stands for a model in placement tests: records moves instead of moving; `size` stands for its bytes."""

    def __init__(self, gb: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(0))
        self.size = int(gb * 1024**3)
        self.on = "cpu"
        self.moves: list[str] = []

    def to(self, device):
        self.on = str(device)
        self.moves.append(self.on)
        return self


class FakeBundle:
    def __init__(self, **models):
        self._models = models

    def models(self):
        return self._models


def start_app(out: Path, port: int, cache: Path, **env_extra):
    """Start `demo_gradio.py --tiny` as a real server process writing to `out`; returns (process, url, log)."""
    import subprocess
    import sys
    import time
    import urllib.request

    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEPACK_")}
    env.update(FRAMEPACK_CACHE_DIR=str(cache), FRAMEPACK_OUTPUT_DIR=str(out), GRADIO_ANALYTICS_ENABLED="False",
               **env_extra)
    log = out / f"app-{port}.log"
    proc = subprocess.Popen([sys.executable, "demo_gradio.py", "--tiny", "--port", str(port)], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc, f"http://127.0.0.1:{port}/", log
        except OSError:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the app did not start")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from diffusers_helper.models.tiny import ensure_tiny_models

    root = os.environ.get("FRAMEPACK_TEST_TINY_ROOT")  # reuse between local runs if set
    return ensure_tiny_models(Path(root) if root else tmp_path_factory.mktemp("cache") / "tiny-models")


@pytest.fixture(scope="session")
def tiny_bundles(tiny_root):
    from diffusers_helper.models.loading import load_models
    from diffusers_helper.models.tiny import tiny_spec

    return {name: load_models(tiny_spec(name, tiny_root)) for name in ("tiny", "tiny-f1")}


@pytest.fixture
def test_image() -> np.ndarray:
    """A smooth 96x128 RGB gradient with a bright square, deterministic."""
    y, x = np.mgrid[0:96, 0:128]
    img = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.uint8)
    img[30:60, 40:80] = 240
    return img


@pytest.fixture
def image_file(tmp_path, test_image):
    """The test image saved as a PNG file."""
    from PIL import Image

    path = tmp_path / "input.png"
    Image.fromarray(test_image).save(path)
    return path


def oom_once(module, calls: dict):
    """Make `module.forward` raise CUDA out-of-memory on its first call only; `calls["n"]` counts the calls."""
    real = module.forward
    calls.setdefault("n", 0)

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    module.forward = forward


@pytest.fixture
def encoded_frames(monkeypatch):
    """Capture the frames handed to the MP4 encoder (x264's bitstream itself is not bit-reproducible)."""
    import diffusers_helper.pipeline.finisher as engine_module  # where a job's files are written

    captured = {}
    real = engine_module.write_mp4

    def spy(frames, path, crf=16):
        captured[path.name] = frames.copy()
        return real(frames, path, crf=crf)

    monkeypatch.setattr(engine_module, "write_mp4", spy)
    return lambda final: captured[final.video_path.name]


@pytest.fixture
def sampled_latents(monkeypatch):
    """Capture every section's sampled latents (float32), for comparisons with a tolerance.

    Frames and latents are bit-equal only where the same kernels run on the same memory layout: on some
    CPUs (AMD EPYC, for one) BLAS takes another path for weights that are not 64-byte aligned, as the
    memory-mapped safetensors are, so a reloaded model can differ in the last bits."""
    import torch

    import diffusers_helper.pipeline.engine as engine_module

    captured = []
    real = engine_module.sample_section

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        captured.append(out.detach().float().cpu().clone())
        return out

    monkeypatch.setattr(engine_module, "sample_section", spy)

    def take():
        latents = torch.cat(captured)
        captured.clear()
        return latents

    return take


@pytest.fixture
def same_weights():
    return _same_weights


def _same_weights(a, b) -> bool:
    """Bit-equal state dicts; quantized tensor subclasses are compared through their inner tensors. Data,
    not arithmetic: this holds on every machine."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    for key, x in sa.items():
        y = sb[key]
        if type(x) is not type(y) or x.shape != y.shape or x.dtype != y.dtype:
            return False
        if type(x) is torch.Tensor or not hasattr(x, "__tensor_flatten__"):
            if not torch.equal(x, y):
                return False
            continue
        names, _ = x.__tensor_flatten__()
        if names != y.__tensor_flatten__()[0]:
            return False
        if not all(torch.equal(getattr(x, n), getattr(y, n)) for n in names):
            return False
    return True
