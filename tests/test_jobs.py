"""The job queue: order, cancellation of queued and running jobs, waiting, history from sidecars."""

import torch

from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.app.jobs import CANCELLED, FAILED, FINISHED, QUEUED, JobQueue, past_jobs
from diffusers_helper.memory.placement import Placement
from diffusers_helper.pipeline.request import GenerationRequest, InputError

import pytest


class _Provider:
    def __init__(self, engine):
        self.engine = engine
        self.asked = []

    def get(self, model):
        self.asked.append(model)
        if model == "broken":
            raise RuntimeError("weights unreadable\nsecond line")
        return self.engine


@pytest.fixture
def queue(tiny_bundles, tmp_path):
    engine = Engine(tiny_bundles["tiny"], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)
    q = JobQueue(_Provider(engine))
    yield q
    q.close()


def _req(image, **kw):
    return GenerationRequest(prompt=kw.pop("prompt", "x"), image=image, **{"seconds": 1.0, "steps": 2, **kw})


def test_jobs_run_in_order_and_finish(queue, test_image, tmp_path):
    a = queue.submit(_req(test_image, prompt="first"), "tiny")
    b = queue.submit(_req(test_image, prompt="second"), "tiny")
    first, second = queue.wait(a, 120), queue.wait(b, 120)
    assert first.state == second.state == FINISHED
    assert first.ended <= second.started and second.frames == 37  # one section, start frame included
    assert [j.job_id for j in queue.jobs()] == [a, b]
    history = past_jobs(tmp_path)
    assert [r["job_id"] for r in history] == [b, a] and history[0]["settings"]["prompt"] == "second"


def test_cancel_queued_and_running(queue, test_image):
    long = queue.submit(_req(test_image, seconds=20, steps=50), "tiny")
    waiting = queue.submit(_req(test_image), "tiny")
    assert queue.get(waiting).state == QUEUED
    assert queue.cancel(waiting) is True
    assert queue.get(waiting).state == CANCELLED
    while queue.get(long).state == QUEUED:
        queue.wait(long, 0.05)
    assert queue.cancel_running() is True
    assert queue.wait(long, 60).state == CANCELLED
    assert queue.cancel(long) is False  # already ended


def test_bad_input_is_rejected_before_queueing(queue, test_image):
    with pytest.raises(InputError, match="no input image"):
        queue.submit(GenerationRequest(prompt="x", image=None), "tiny")
    assert queue.jobs() == []


def test_model_load_failure_fails_the_job(queue, test_image):
    job = queue.submit(_req(test_image), "broken")
    snap = queue.wait(job, 60)
    assert snap.state == FAILED and snap.error == "weights unreadable"
