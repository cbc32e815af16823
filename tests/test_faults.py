"""Faults while writing: a full disk or a forbidden folder fails that job with one line, keeps what was written,
and never kills the queue's worker or leaves the CLI waiting."""

import errno
import json
import time

import pytest
import torch

import diffusers_helper.pipeline.engine as engine_module
import diffusers_helper.pipeline.finisher as finisher_module
from diffusers_helper.app.jobs import FAILED, FINISHED, JobQueue
from diffusers_helper.memory.placement import Placement
from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.request import GenerationRequest

FAULTS = {"disk full": (OSError(errno.ENOSPC, "No space left on device", "/srv/secret/out/x.mp4"), "the disk is full"),
          "permission": (PermissionError(errno.EACCES, "Permission denied", "/srv/secret/out/x.json"),
                         "permission denied")}


class _Provider:
    def __init__(self, engine):
        self.engine = engine

    def get(self, model, progress=None):
        return self.engine


def _failing_once(monkeypatch, name: str, exc: OSError, after: int = 0):
    """Make the engine's `name` writer raise `exc` on its call number `after` (0: the first) only."""
    module = finisher_module if name == "write_mp4" else engine_module  # the video is written by the job's files
    real = getattr(module, name)
    calls = {"n": 0}

    def writer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after + 1:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, writer)


def _request(image):
    return GenerationRequest(prompt="x", image=image, seconds=2.4, steps=2, cache="none")


# each write site: the input PNG, the MP4 after section 1 or 2, the first sidecar, the final sidecar
@pytest.mark.parametrize("site, after", [("write_png", 0), ("write_mp4", 0), ("write_mp4", 1), ("write_json", 0),
                                         ("write_json", 1)])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failed_write_fails_the_job_and_the_queue_goes_on(tiny_bundles, tmp_path, test_image, monkeypatch,
                                                            site, after, fault):
    exc, reason = FAULTS[fault]
    engine = Engine(tiny_bundles["tiny"], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)
    _failing_once(monkeypatch, site, exc, after)
    queue = JobQueue(_Provider(engine))
    try:
        first = queue.submit(_request(test_image), "tiny")
        second = queue.submit(_request(test_image), "tiny")
        a, b = queue.wait(first, 120), queue.wait(second, 120)
    finally:
        queue.close()
    assert a.state == FAILED and b.state == FINISHED, (a, b)
    assert a.error.startswith("Could not write") and reason in a.error and "\n" not in a.error
    assert "/srv/secret" not in a.error  # never a server path
    if site == "write_mp4" and after == 1:  # the second section's MP4 failed: the first one's is kept
        assert a.video and a.frames == 33  # the inverted model's first section: 4 * 9 - 3 frames
    if site == "write_json" and after == 1:  # the video was written, only its record failed
        assert "the video was kept" in a.error and a.video
    if site != "write_json":  # the sidecar says what happened
        record = json.loads(next(tmp_path.glob(f"{a.job_id}.json")).read_text())
        assert record["status"] == "failed" and reason in record["error"]


def test_the_cli_exits_with_one_line_when_the_disk_is_full(tiny_root, tmp_path, test_image, monkeypatch, capsys):
    from PIL import Image

    from diffusers_helper.generate import main

    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tiny_root.parent))
    image = tmp_path / "in.png"
    Image.fromarray(test_image).save(image)
    _failing_once(monkeypatch, "write_mp4", FAULTS["disk full"][0])
    t0 = time.perf_counter()
    code = main(["--image", str(image), "--prompt", "x", "--model", "tiny", "--seconds", "1", "--steps", "1",
                 "--output", str(tmp_path / "out"), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and time.perf_counter() - t0 < 60
    assert err == ["error: Could not write x.mp4: the disk is full"]


def test_an_engine_that_raises_past_its_own_handling_fails_only_its_job(tmp_path):
    class Broken:
        def generate(self, *args, **kwargs):
            raise RuntimeError("the emit callback blew up")

    ok = []

    class Fine:
        def generate(self, request, emit, cancel, job_id=None):
            from diffusers_helper.pipeline.events import Finished

            ok.append(job_id)
            emit(Finished(tmp_path / "v.mp4", tmp_path / "v.json", 1, 0.1))

    engines = iter([Broken(), Fine()])

    class Provider:
        def get(self, model, progress=None):
            return next(engines)

    queue = JobQueue(Provider())
    image = torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()
    try:
        a = queue.submit(GenerationRequest(prompt="x", image=image), "tiny")
        b = queue.submit(GenerationRequest(prompt="x", image=image), "tiny")
        assert queue.wait(a, 30).state == FAILED and "blew up" in queue.get(a).error
        assert queue.wait(b, 30).state == FINISHED and ok == [b]
    finally:
        queue.close()
