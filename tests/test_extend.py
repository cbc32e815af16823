"""Video extension (F1): the video's last frames become the history and the output holds the video and the new
frames; bad videos and the wrong model fail in one line; the queue keeps the video across a restart."""

import json
from pathlib import Path

import numpy as np
import pytest

from diffusers_helper.app.journal import Journal
from diffusers_helper.media.video import read_video, write_mp4
from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.events import Failed, Finished
from diffusers_helper.pipeline.request import GenerationRequest


def _video(path: Path, frames: int, size: int = 64) -> Path:
    y, x = np.mgrid[0:size, 0:size]
    clip = np.stack([np.stack([(x * 4 + t * 3) % 256, (y * 4) % 256, np.full_like(x, 128)], -1)
                     for t in range(frames)]).astype(np.uint8)
    return write_mp4(clip, path, crf=0)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _video(tmp_path_factory.mktemp("src") / "walk.mp4", 45)


def test_extending_keeps_the_video_and_adds_sections(tiny_bundles, tmp_path, source, encoded_frames):
    engine = Engine(tiny_bundles["tiny-f1"], outputs_dir=tmp_path)
    frames, _ = read_video(source)
    final = engine.generate(GenerationRequest(prompt="it goes on", extend_video=str(source), seconds=1.2, steps=2,
                                              seed=4, cache="none"), lambda e: None)
    assert isinstance(final, Finished), final
    out = encoded_frames(final)
    assert out.shape[0] == 45 + 36 and final.frames == 81  # the video, then one section of 36 new frames
    assert np.array_equal(out[:12], frames[:12])  # the start of the video is the video itself (64x64 fits a bucket)
    record = json.loads(Path(final.sidecar_path).read_text())
    assert record["source_video"] == "walk.mp4" and record["source_frames"] == 45
    assert "extend_video" not in record["settings"]  # no server path in the settings


@pytest.mark.parametrize("model, frames, message", [
    ("tiny", 45, "extending a video continues it forward: choose the F1 model"),
    ("tiny-f1", 20, "the video is too short to extend: at least 37 frames"),
])
def test_wrong_model_or_short_video_fails_in_one_line(tiny_bundles, tmp_path, model, frames, message):
    clip = _video(tmp_path / "clip.mp4", frames)
    final = Engine(tiny_bundles[model], outputs_dir=tmp_path).generate(
        GenerationRequest(prompt="x", extend_video=str(clip), seconds=1.2, steps=2), lambda e: None)
    assert isinstance(final, Failed) and message in final.error and "\n" not in final.error


def test_not_a_video_is_refused_before_any_work(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a readable video: notes.mp4"):
        GenerationRequest(prompt="x", extend_video=str(bad)).validate()


def test_the_journal_keeps_the_video_to_extend(tmp_path, source):
    journal = Journal(tmp_path)
    request = GenerationRequest(prompt="x", extend_video=str(source)).validate()
    copy = journal.save_image("job2", request.image, video=request.extend_video)
    journal.write([{"job_id": "job2", "model": "tiny-f1", "state": "queued", "settings": request.to_record(),
                    "targets": request.targets_record()}])
    [restored] = journal.recover()
    assert restored.extend_video == copy and Path(copy).read_bytes() == Path(source).read_bytes()


def test_cli_extend(tmp_path, tiny_root, source, monkeypatch):
    from diffusers_helper.generate import main

    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tiny_root.parent))
    out = tmp_path / "o"
    assert main(["--extend", str(source), "--prompt", "more", "--model", "tiny-f1", "--seconds", "1.2", "--steps", "2",
                 "--output", str(out), "--quiet"]) == 0
    assert json.loads(next(out.glob("*.json")).read_text())["frames"] == 81
    assert main(["--prompt", "x", "--model", "tiny-f1", "--output", str(out)]) == 2  # neither --image nor --extend
