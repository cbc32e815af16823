"""End to end on the tiny models: MP4s with the formula's frame count, sidecars, cancel, bad input."""

import json

import numpy as np
import pytest

from diffusers_helper.config import job_fields
from diffusers_helper.pipeline.engine import Engine, iter_events
from diffusers_helper.pipeline.events import Cancelled, Failed, Finished, SectionFinished, Stage, StepProgress
from diffusers_helper.memory.placement import Placement
from diffusers_helper.pipeline.request import GenerationRequest
from diffusers_helper.pipeline.sampling import CancelToken
from diffusers_helper.pipeline.sections import frame_count, section_count
from diffusers_helper.media.video import read_video_info

import torch


def _request(image, **kw):
    base = dict(prompt="a cat walks", image=image, seconds=2.4, steps=3, seed=7, latent_window_size=9,
                cache="none")
    base.update(kw)
    return GenerationRequest(**base)


def _engine(bundles, name, tmp_path):
    return Engine(bundles[name], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)


@pytest.mark.parametrize("model", ["tiny", "tiny-f1"])
def test_two_sections_make_a_playable_mp4(tiny_bundles, tmp_path, test_image, model):
    engine = _engine(tiny_bundles, model, tmp_path)
    events = list(iter_events(engine, _request(test_image)))
    final = events[-1]
    assert isinstance(final, Finished), final
    sections = section_count(2.4, 9)
    assert sections == 2
    expected_frames = frame_count(sections, 9)  # 2 * 36 + 1
    assert expected_frames == 73
    frames, fps, (h, w) = read_video_info(final.video_path)
    assert frames == expected_frames == final.frames
    assert fps == 30
    assert (h, w) == (48, 64)  # 64-resolution bucket for a 4:3 image

    progress = [e for e in events if isinstance(e, StepProgress)]
    assert [(e.section, e.step) for e in progress] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert progress[0].preview.dtype == np.uint8 and progress[0].preview.shape == (6, 9 * 8, 3)
    finished = [e for e in events if isinstance(e, SectionFinished)]
    # inverted: the first section is the video's end, without the start frame (4*9-3 frames);
    # f1: the first section follows the start frame (4*9+1 frames)
    assert [e.frames for e in finished] == ([33, 73] if model == "tiny" else [37, 73])
    assert not finished[0].video_path.exists()  # replaced by the longer video
    assert any(isinstance(e, Stage) and "Encoding prompt" in e.message for e in events)

    sidecar = json.loads(final.sidecar_path.read_text())
    assert sidecar["status"] == "finished"
    assert sidecar["settings"]["seed"] == 7 and sidecar["settings"]["steps"] == 3
    assert set(sidecar["settings"]) == {f.name for f in job_fields()} | {"prompt", "negative_prompt"}
    assert sidecar["model"] == model and sidecar["frames"] == 73
    assert set(sidecar["versions"]) >= {"torch", "diffusers", "transformers", "framepack_app"}
    assert (tmp_path / f"{sidecar['job_id']}.png").is_file()
    assert not list(tmp_path.glob(".*partial*"))


def test_same_seed_same_video_and_other_seed_differs(tiny_bundles, tmp_path, test_image, encoded_frames):
    engine = _engine(tiny_bundles, "tiny-f1", tmp_path)
    req = dict(seconds=1.0, steps=2)
    a = encoded_frames(engine.generate(_request(test_image, **req), lambda e: None))
    b = encoded_frames(engine.generate(_request(test_image, **req), lambda e: None))
    c = encoded_frames(engine.generate(_request(test_image, seed=8, **req), lambda e: None))
    assert a.shape == (37, 48, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def _cancel_at(engine, request, section: int, step: int) -> list:
    """Run a job and press stop when it reports (section, step); returns every event. The stop is pressed from
    the event callback, on the job's thread, so the job cannot race past the step in the meantime."""
    cancel = CancelToken()
    events = []

    def emit(event):
        events.append(event)
        if isinstance(event, StepProgress) and (event.section, event.step) == (section, step):
            cancel.cancel()

    engine.generate(request, emit, cancel)
    return events


def test_cancel_mid_section_keeps_finished_sections(tiny_bundles, tmp_path, test_image):
    engine = _engine(tiny_bundles, "tiny", tmp_path)
    events = _cancel_at(engine, _request(test_image, seconds=3.6, steps=4), section=2, step=2)
    final = events[-1]
    assert isinstance(final, Cancelled)
    assert not any(isinstance(e, StepProgress) and e.section == 2 and e.step > 2 for e in events)
    frames, fps, _ = read_video_info(final.video_path)
    assert frames == 33  # section 1 of 3 (inverted: the video's last 4*9-3 frames)
    sidecar = json.loads(final.sidecar_path.read_text())
    assert sidecar["status"] == "cancelled" and sidecar["video"] == str(final.video_path)


def test_teacache_skips_steps_and_threshold_zero_is_lossless(tiny_bundles, tmp_path, test_image, encoded_frames):
    engine = _engine(tiny_bundles, "tiny-f1", tmp_path)
    base = engine.generate(_request(test_image, seconds=1.0, steps=6), lambda e: None)
    notes = []
    zero = engine.generate(_request(test_image, seconds=1.0, steps=6, cache="teacache", teacache_threshold=0.0),
                           lambda e: notes.append(e) if isinstance(e, SectionFinished) else None)
    assert notes[0].cache_note == "TeaCache: 6/6 steps computed"
    lazy = []
    engine.generate(_request(test_image, seconds=1.0, steps=6, cache="teacache", teacache_threshold=1.0),
                    lambda e: lazy.append(e) if isinstance(e, SectionFinished) else None)
    assert lazy[0].cache_note == "TeaCache: 2/6 steps computed"  # first and last always compute
    assert np.array_equal(encoded_frames(base), encoded_frames(zero))
    # the hooks stay attached but pass through once the job is over
    assert engine.step_caches.enabled is False


@pytest.mark.parametrize("kw, message", [
    (dict(image=None), "no input image"),
    (dict(seconds=0), "video length"),
    (dict(seconds=-1), "video length"),
    (dict(steps=0), "steps must be"),
    (dict(image=np.zeros((8, 8, 3), np.uint8)), "too small"),
    (dict(image=np.zeros((16, 4000, 3), np.uint8)), "too thin"),
    (dict(image=np.zeros((9000, 9000, 1), np.uint8)[..., 0]), "too large"),
])
def test_bad_requests_fail_with_a_message_and_no_video(tiny_bundles, tmp_path, test_image, kw, message):
    engine = _engine(tiny_bundles, "tiny", tmp_path)
    req = _request(test_image)
    for k, v in kw.items():
        setattr(req, k, v)
    final = engine.generate(req, lambda e: None)
    assert isinstance(final, Failed)
    assert message in final.error and "\n" not in final.error
    assert not list(tmp_path.glob("*.mp4"))


def test_background_decode_same_frames_and_order(tiny_bundles, tmp_path, test_image, encoded_frames):
    sync = Engine(tiny_bundles["tiny"], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path,
                  async_decode="off")
    background = Engine(tiny_bundles["tiny"], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path,
                        async_decode="on")
    assert background.background_decode and not sync.background_decode
    a = sync.generate(_request(test_image, seconds=3.6, steps=2), lambda e: None)
    events = []
    b = background.generate(_request(test_image, seconds=3.6, steps=2), events.append)
    assert isinstance(b, Finished) and b.frames == a.frames == 109
    assert [e.section for e in events if isinstance(e, SectionFinished)] == [1, 2, 3]
    assert events[-1] is b  # Finished comes after every section is written
    assert np.array_equal(encoded_frames(a), encoded_frames(b))


def test_background_decode_keeps_sections_on_cancel(tiny_bundles, tmp_path, test_image):
    engine = Engine(tiny_bundles["tiny"], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path,
                    async_decode="on")
    events = _cancel_at(engine, _request(test_image, seconds=3.6, steps=3), section=3, step=1)
    final = events[-1]
    assert isinstance(final, Cancelled)
    assert [e.section for e in events if isinstance(e, SectionFinished)] == [1, 2]  # both sampled sections kept
    assert read_video_info(final.video_path)[0] == 69


def test_decode_failure_fails_the_job_without_hanging(tiny_bundles, tmp_path, test_image):
    engine = Engine(tiny_bundles["tiny-f1"], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path,
                    async_decode="on")

    def broken(latents, quality=False):
        raise RuntimeError("decoder exploded")

    engine.decoder.decode = broken
    final = engine.generate(_request(test_image, seconds=2.4, steps=2), lambda e: None)
    assert isinstance(final, Failed) and "decoder exploded" in final.error
    assert json.loads(final.sidecar_path.read_text())["status"] == "failed"
