"""End image and keyframes: which section each steers, exactness at strength 0, F1's refusal, the queue's journal."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_helper.app.journal import Journal
from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.events import Failed, Finished
from diffusers_helper.pipeline.request import GenerationRequest
from diffusers_helper.pipeline.sections import SectionSchedule


def _other(test_image, shift: int) -> np.ndarray:
    return np.roll(255 - test_image, shift, axis=1)


def _job(engine, test_image, **kw):
    captured = []
    decode = engine.decoder.decode
    engine.decoder.decode = lambda z, *a, **k: (captured.append(z.clone()), decode(z, *a, **k))[1]
    try:
        final = engine.generate(GenerationRequest(prompt="a cat", image=test_image, seed=5, steps=3, cache="none",
                                                  **{"seconds": 2.4, **kw}), lambda e: None)
    finally:
        engine.decoder.decode = decode
    return final, captured


def test_targets_pick_the_section_that_ends_nearest():
    start = torch.zeros(1, 16, 1, 4, 4)
    schedule = SectionSchedule("inverted", start, 4, 9)  # 4 sections of 1.2 s
    ends = schedule.set_targets(torch.ones(1, 16, 1, 4, 4), [(1.3, torch.full((1, 16, 1, 4, 4), 2.0)),
                                                             (3.5, torch.full((1, 16, 1, 4, 4), 3.0))], 1.2, 0.5)
    assert ends == {1: "keyframe at 1.3s, ending at 1.2s", 3: "keyframe at 3.5s, ending at 3.6s",
                    4: "end image, ending at 4.8s"}
    # the first generated section is the video's last: its empty history frame becomes half the end latent
    assert torch.equal(schedule.inputs(0).latents_clean[:, :, 1:], torch.full((1, 16, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="ends the same section as the keyframe at 1.3s"):
        schedule.set_targets(None, [(1.3, start), (1.5, start)], 1.2, 1.0)
    with pytest.raises(ValueError, match="outside the video"):
        schedule.set_targets(None, [(9.0, start)], 1.2, 1.0)
    with pytest.raises(ValueError, match="F1 model generates forward"):
        SectionSchedule("f1", start, 2, 9).set_targets(start, [], 1.2, 1.0)


def test_end_image_and_keyframes_in_a_job(tiny_bundles, tmp_path, test_image):
    engine = Engine(tiny_bundles["tiny"], outputs_dir=tmp_path)
    plain, plain_latents = _job(engine, test_image)
    off, off_latents = _job(engine, test_image, end_image=_other(test_image, 5), end_strength=0.0)
    assert isinstance(off, Finished) and all(torch.equal(a, b) for a, b in zip(plain_latents, off_latents))
    ended, ended_latents = _job(engine, test_image, end_image=_other(test_image, 5),
                                keyframes=[(1.2, _other(test_image, 11))])
    assert isinstance(ended, Finished), ended
    assert not torch.equal(plain_latents[0], ended_latents[0])
    record = json.loads(Path(ended.sidecar_path).read_text())
    assert record["section_targets"] == {"1": "keyframe at 1.2s, ending at 1.2s", "2": "end image, ending at 2.4s"}
    assert record["end_image_given"] and record["keyframe_seconds"] == [1.2]
    job = Path(ended.sidecar_path).stem
    assert (tmp_path / f"{job}_end.png").is_file() and (tmp_path / f"{job}_keyframe1.png").is_file()


def test_f1_refuses_an_end_image_in_one_line(tiny_bundles, tmp_path, test_image):
    final, _ = _job(Engine(tiny_bundles["tiny-f1"], outputs_dir=tmp_path), test_image, end_image=test_image)
    assert isinstance(final, Failed) and "F1 model generates forward" in final.error and "\n" not in final.error


def test_the_journal_keeps_end_image_and_keyframes(tmp_path, test_image):
    journal = Journal(tmp_path)
    request = GenerationRequest(prompt="x", image=test_image, end_image=_other(test_image, 3),
                                keyframes=[(2.0, _other(test_image, 7))]).validate()
    journal.save_image("job1", request.image, request.end_image, request.keyframes)
    journal.write([{"job_id": "job1", "model": "tiny", "state": "queued", "settings": request.to_record(),
                    "targets": request.targets_record()}])
    [restored] = journal.recover()
    assert np.array_equal(restored.end_image, request.end_image)
    assert restored.keyframes[0][0] == 2.0 and np.array_equal(restored.keyframes[0][1], request.keyframes[0][1])
    journal.forget("job1")
    assert not list((tmp_path / ".queue").glob("job1*"))


def test_cli_end_image_and_keyframe(tmp_path, image_file, tiny_root, monkeypatch):
    from diffusers_helper.generate import main

    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tiny_root.parent))
    out = tmp_path / "o"
    code = main(["--image", str(image_file), "--prompt", "a cat", "--model", "tiny", "--seconds", "2.4", "--steps", "2",
                 "--end-image", str(image_file), "--keyframe", f"1.2:{image_file}", "--end-strength", "0.7",
                 "--output", str(out), "--quiet"])
    assert code == 0
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["settings"]["end_strength"] == 0.7 and len(record["section_targets"]) == 2
    assert main(["--image", str(image_file), "--prompt", "x", "--model", "tiny", "--keyframe", "soon:a.png",
                 "--output", str(out)]) == 2
