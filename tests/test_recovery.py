"""Crash recovery: the queue is kept on disk; after kill -9 the queued jobs run again, the interrupted job keeps
its finished sections in Past videos, and no half-written file is left."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import torch

from conftest import start_app
from diffusers_helper.app.jobs import FINISHED, QUEUED, RUNNING, JobQueue, past_jobs
from diffusers_helper.memory.placement import Placement
from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.request import GenerationRequest


class _Stuck:
    """An engine that starts a job and never returns: the process 'dies' with the job running."""

    def __init__(self):
        self.started = threading.Event()

    def generate(self, request, emit, cancel, job_id=None):
        self.started.set()
        threading.Event().wait()


class _Provider:
    def __init__(self, engine):
        self.engine = engine

    def get(self, model, progress=None):
        return self.engine


def test_a_new_queue_restores_what_the_last_one_left(tiny_bundles, tmp_path, test_image):
    stuck = _Stuck()
    first = JobQueue(_Provider(stuck), outputs_dir=tmp_path)
    running = first.submit(GenerationRequest(prompt="running", image=test_image, seconds=1, steps=1), "tiny")
    queued = first.submit(GenerationRequest(prompt="waiting", image=test_image, seconds=1, steps=2, seed=5), "tiny")
    assert stuck.started.wait(30)
    # what a killed process leaves: its sidecar says running, a finished section's MP4, a half-written file
    (tmp_path / f"{running}.json").write_text(json.dumps({"job_id": running, "status": "running",
                                                          "settings": {"prompt": "running"}}))
    (tmp_path / f"{running}_33.mp4").write_bytes(b"a complete section")
    (tmp_path / f".{running}_69.partial.mp4").write_bytes(b"cut off")
    saved = json.loads((tmp_path / "queue.json").read_text())["jobs"]
    assert [(j["job_id"], j["state"]) for j in saved] == [(running, RUNNING), (queued, QUEUED)]

    engine = Engine(tiny_bundles["tiny"], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path)
    second = JobQueue(_Provider(engine), outputs_dir=tmp_path)  # the restart
    try:
        restored = second.wait(queued, 120)
        assert restored.state == FINISHED and restored.prompt == "waiting"
        assert json.loads(Path(restored.sidecar).read_text())["settings"]["seed"] == 5
    finally:
        second.close()
    interrupted = json.loads((tmp_path / f"{running}.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["video"].endswith(f"{running}_33.mp4")
    assert [r["job_id"] for r in past_jobs(tmp_path)][-1] == running  # listed in Past videos
    assert not list(tmp_path.glob(".*.partial*")) and not list((tmp_path / ".queue").glob("*.png"))
    assert json.loads((tmp_path / "queue.json").read_text())["jobs"] == []


def test_kill_9_mid_job_then_restart(tiny_root, tmp_path, image_file):
    from gradio_client import Client, handle_file

    from test_ui import _free_port

    out = tmp_path / "outputs"
    out.mkdir()
    proc, url, _ = start_app(out, _free_port(), tiny_root.parent)
    try:
        client = Client(url, verbose=False)
        image = handle_file(str(image_file))
        long_job = client.predict(image, "Tiny (inverted, offline)", prompt="long", seconds=12.0, steps=12,
                                  api_name="/submit").split("`")[1]
        waiting = client.predict(image, "Tiny (inverted, offline)", prompt="after the crash", seconds=1.0,
                                 steps=2, api_name="/submit").split("`")[1]
        deadline = time.time() + 120
        while time.time() < deadline and not client.predict(long_job, api_name="/job_status")["frames"]:
            time.sleep(0.2)
        assert client.predict(long_job, api_name="/job_status")["state"] == "running"  # mid-job, a section kept
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    proc, url, _ = start_app(out, _free_port(), tiny_root.parent)
    try:
        client = Client(url, verbose=False)
        deadline = time.time() + 120
        while time.time() < deadline:
            status = client.predict(waiting, api_name="/job_status")
            if status["state"] == "finished":
                break
            time.sleep(0.5)
        assert status["state"] == "finished" and status["frames"] == 37
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    record = json.loads((out / f"{long_job}.json").read_text())
    assert record["status"] == "interrupted" and os.path.getsize(record["video"]) > 1000
    assert long_job in [r["job_id"] for r in past_jobs(out)]
    assert not list(out.glob(".*.partial*"))
