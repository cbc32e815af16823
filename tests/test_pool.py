"""The job pool on Ray with two CPU workers and the tiny model: many clients, a worker killed mid-job, cancel,
files sent to the head when the output folder is not shared, and when the app uses no pool at all."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from diffusers_helper.app.jobs import CANCELLED, FAILED, FINISHED, RUNNING, JobQueue
from diffusers_helper.pipeline.events import TERMINAL
from diffusers_helper.pipeline.request import GenerationRequest


class CountingQueue(JobQueue):
    """Counts each job's terminal events: a job must end exactly once."""

    def __init__(self, *args, **kwargs):
        self.ends = Counter()
        super().__init__(*args, **kwargs)

    def _on_event(self, job, event):
        if isinstance(event, TERMINAL):
            self.ends[job.snapshot.job_id] += 1
        super()._on_event(job, event)


def _req(image, **kw):
    return GenerationRequest(prompt=kw.pop("prompt", "x"), image=image, **{"seconds": 1.0, "steps": 2, **kw})


def _wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pool(tiny_root, tmp_path_factory):
    pytest.importorskip("ray")
    from diffusers_helper.app.workers import job_pool
    from diffusers_helper.config import load_settings

    out = tmp_path_factory.mktemp("pool-out")
    os.environ["FRAMEPACK_CACHE_DIR"] = str(tiny_root.parent)  # the workers inherit it: the same tiny models
    try:
        settings = load_settings(["--tiny", "--workers", "2", "--output-dir", str(out)]).settings
        p = job_pool(settings, quiet=True, num_cpus=2)
        p.preload("tiny")
        yield p
        p.close()
    finally:
        os.environ.pop("FRAMEPACK_CACHE_DIR", None)


@pytest.fixture
def queue(pool):
    q = CountingQueue(None, outputs_dir=pool.outputs, pool=pool)
    yield q
    q.close()


def test_six_jobs_from_three_clients_each_end_once(queue, pool, test_image):
    ids, lock = [], threading.Lock()

    def client(n):
        for k in range(2):
            job = queue.submit(_req(test_image, prompt=f"client {n} job {k}", seed=10 * n + k), "tiny")
            with lock:
                ids.append(job)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    snaps = [queue.wait(j, 180) for j in ids]
    assert len(set(ids)) == 6 and sorted(ids) == sorted(s.job_id for s in queue.jobs())
    assert all(s.state == FINISHED for s in snaps), [(s.state, s.error) for s in snaps]
    assert queue.ends == Counter({j: 1 for j in ids})  # none lost, none run twice
    videos = {s.video for s in snaps}
    assert len(videos) == 6 and all(Path(v).is_file() and Path(v).name.startswith(s.job_id)
                                    for v, s in zip([s.video for s in snaps], snaps))
    assert {s.worker for s in snaps} == {"w0", "w1"} and {s.gpu for s in snaps} == {"CPU"}
    for s in snaps:
        record = json.loads(Path(s.sidecar).read_text())
        assert record["status"] == "finished" and record["worker"] == s.worker and record["gpu"] == "CPU"
        assert record["settings"]["prompt"] == s.prompt


def test_cancel_reaches_the_worker_running_that_job(queue, test_image):
    a = queue.submit(_req(test_image, seconds=20, steps=50, prompt="a"), "tiny")
    b = queue.submit(_req(test_image, seconds=20, steps=50, prompt="b"), "tiny")
    _wait_for(lambda: all(queue.get(j).state == RUNNING and queue.get(j).step > 0 for j in (a, b)))
    assert queue.get(a).worker != queue.get(b).worker
    assert queue.cancel(a) is True
    assert queue.wait(a, 60).state == CANCELLED
    step = queue.get(b).step
    _wait_for(lambda: queue.get(b).step != step or queue.get(b).section > 1, 30)  # b goes on sampling
    assert queue.get(b).state == RUNNING
    queue.cancel(b)
    assert queue.wait(b, 60).state == CANCELLED


def test_a_killed_worker_fails_only_its_job_and_is_restarted(queue, pool, test_image):
    victim = queue.submit(_req(test_image, seconds=4, steps=8, prompt="victim"), "tiny")
    other = queue.submit(_req(test_image, seconds=3, steps=8, prompt="bystander"), "tiny")
    _wait_for(lambda: queue.get(victim).video is not None)  # a section finished: it must be kept
    snap = queue.get(victim)
    slot = ["w0", "w1"].index(snap.worker)
    old_pid = pool.pids()[slot]
    os.kill(old_pid, signal.SIGKILL)
    failed = queue.wait(victim, 60)
    assert failed.state == FAILED and "died during the job" in failed.error and "\n" not in failed.error
    assert Path(failed.video).is_file()  # the sections finished before the kill
    record = json.loads(Path(pool.outputs / f"{victim}.json").read_text())
    assert record["status"] == "failed" and record["video"] == failed.video
    assert queue.wait(other, 120).state == FINISHED
    _wait_for(lambda: pool.pids()[slot] != old_pid)  # a new worker in its place
    later = [queue.submit(_req(test_image, prompt=f"after {n}"), "tiny") for n in range(3)]
    done = [queue.wait(j, 180) for j in later]
    assert all(s.state == FINISHED for s in done), [(s.state, s.error) for s in done]
    assert snap.worker in {s.worker for s in done}  # restarted and used again
    assert all(queue.ends[j] == 1 for j in (victim, other, *later))


def test_files_reach_the_head_when_the_folder_is_not_shared(tiny_root, tmp_path, test_image, monkeypatch):
    """A worker whose output folder is its own sends each file to the head with the event that names it."""
    from diffusers_helper.app.startup import engine_provider
    from diffusers_helper.config import load_settings
    from diffusers_helper.parallel.pool import WorkerPool
    from diffusers_helper.parallel.worker import PoolWorker

    monkeypatch.setenv("FRAMEPACK_CACHE_DIR", str(tiny_root.parent))
    settings = load_settings(["--tiny", "--output-dir", str(tmp_path / "head")]).settings
    worker = PoolWorker("w7", lambda **kw: engine_provider(settings, **kw), str(tmp_path / "head"), share="auto")
    assert not worker.shared  # no probe file from a head: not shared
    head = WorkerPool.__new__(WorkerPool)  # only the head's file handling, without Ray
    head.outputs = tmp_path / "head"
    head.outputs.mkdir()
    threading.Thread(target=worker.generate, args=("job1", "tiny", _req(test_image, seconds=2))).start()
    events = []
    while not events or not isinstance(events[-1], TERMINAL):
        events += [head._land(s, "job1") for s in worker.poll("job1", 1.0)]
    assert sorted(p.name for p in head.outputs.iterdir()) == ["job1.json", "job1.png", "job1_73.mp4"]
    assert events[-1].video_path == head.outputs / "job1_73.mp4"
    record = json.loads((head.outputs / "job1.json").read_text())
    assert record["status"] == "finished" and record["video"] == str(head.outputs / "job1_73.mp4")
    assert record["worker"] == "w7" and not list(Path(worker.provider.outputs_dir).iterdir())


def test_without_a_pool_the_in_process_worker_is_used(caplog, monkeypatch):
    from diffusers_helper.parallel import pool as pool_module

    caplog.set_level(logging.INFO, logger="framepack.pool")
    assert pool_module.start_pool(None, "out", workers=1) is None
    assert pool_module.start_pool(None, "out", workers=0, local_gpus=1) is None
    monkeypatch.setattr(pool_module, "ray_installed", lambda: False)
    assert pool_module.start_pool(None, "out", workers=4) is None
    assert [r.getMessage().split(" (pip")[0] for r in caplog.records] == [
        "Job pool: one in-process worker (workers = 1)", "Job pool: one GPU; one in-process worker",
        "Job pool: Ray not installed; one in-process worker"]
