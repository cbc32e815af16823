"""Context parallel on CPU ranks (gloo): the split forward equals the whole one, the CLI under torchrun writes one
video equal to the one-process video, and the ranks stay in step when one of them ends a job early."""

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward_rank(rank: int, world: int, port: int, tiny_root: str, attention: str, text_tokens: int, out: str):
    from diffusers_helper.accel.context_parallel import ContextParallel
    from diffusers_helper.caches.base import set_agreement
    from diffusers_helper.memory.placement import Placement
    from diffusers_helper.models.loading import load_models
    from diffusers_helper.models.tiny import tiny_spec
    from diffusers_helper.parallel.ranks import init_ranks
    from diffusers_helper.pipeline.prepare import TransformerPlan, prepare_transformer
    from diffusers_helper.pipeline.warmup import forward_fn, section_inputs

    torch.set_num_threads(1)
    init_ranks(rank, world, port=port)
    bundle = load_models(tiny_spec("tiny", tiny_root), parts=["transformer"])
    model = bundle.transformer
    cond, noise = section_inputs(model, 64, torch.float32, torch.device("cpu"), text_tokens=text_tokens)
    whole = forward_fn(model, cond, noise, torch.float32, torch.device("cpu"))()
    try:
        prepare_transformer(bundle, TransformerPlan(context_parallel=ContextParallel(world, attention)),
                            Placement.choose(torch.device("cpu"), "full"))
    except ValueError as exc:  # ring on CPUs: refused with a reason
        Path(out, f"rank{rank}.json").write_text(json.dumps({"error": str(exc)}))
        torch.distributed.destroy_process_group()
        return
    try:
        split = forward_fn(model, cond, noise, torch.float32, torch.device("cpu"))()
        record = {"err": float((split - whole).norm() / whole.norm()), "shape": list(split.shape)}
    except ValueError as exc:
        record = {"error": str(exc)}
    set_agreement(None)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("text_tokens", [60, 61])
def test_split_forward_equals_whole_forward(tiny_root, tmp_path, text_tokens):
    """Two ranks, each holding half of the tokens (odd text lengths give uneven halves), give the one-rank output
    of the same inputs: a wrong split, a misplaced rotary table or a bad gather changes it by far more than 1e-5."""
    mp.start_processes(_forward_rank, args=(2, _port(), str(tiny_root), "ulysses", text_tokens, str(tmp_path)),
                       nprocs=2, start_method="spawn")
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record.get("err", 1) < 1e-5, (rank, record)


def test_ring_attention_on_cpus_is_refused_with_a_reason(tiny_root, tmp_path):
    mp.start_processes(_forward_rank, args=(2, _port(), str(tiny_root), "ring", 60, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    assert "needs a CUDA attention kernel" in json.loads((tmp_path / "rank0.json").read_text())["error"]


def _sync_rank(rank: int, world: int, port: int, out: str):
    from diffusers_helper.parallel.ranks import RankSync, init_ranks

    init_ranks(rank, world, port=port)
    sync = RankSync()
    checks = 0
    if rank == 0:
        sync.cancelled  # one step together, then rank 0 ends its job early (as when its disk is full)
        checks = 1
    else:
        while not sync.cancelled and checks < 100:  # keeps sampling until told
            checks += 1
    sync.end_job()
    Path(out, f"sync{rank}.json").write_text(json.dumps({"checks": checks, "aborted": sync.aborted}))
    torch.distributed.destroy_process_group()


def test_a_rank_that_ends_early_ends_the_others(tmp_path):
    mp.start_processes(_sync_rank, args=(2, _port(), str(tmp_path)), nprocs=2, start_method="spawn")
    leader = json.loads((tmp_path / "sync0.json").read_text())
    follower = json.loads((tmp_path / "sync1.json").read_text())
    assert follower == {"checks": 1, "aborted": True}  # one step in step, then the end reached it
    assert leader["checks"] == 1


def _frames(path) -> np.ndarray:
    import av

    with av.open(str(path)) as box:
        return np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)]).astype(np.float32)


def test_cli_under_torchrun_writes_the_one_rank_video(tiny_root, tmp_path, image_file):
    """`torchrun --nproc-per-node 2 -m diffusers_helper.generate`: rank 0 writes the only video, whose frames are
    the one-process frames up to float rounding and MP4 coding; the other rank writes nothing there."""
    env = dict(os.environ, FRAMEPACK_CACHE_DIR=str(tiny_root.parent), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = ["-m", "diffusers_helper.generate", "--image", str(image_file), "--prompt", "waves at dusk", "--model",
            "tiny", "--seconds", "1", "--steps", "3", "--cache", "none", "--offline", "--quiet"]
    one = subprocess.run([sys.executable, *args, "--output", str(tmp_path / "one")], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_port()), *args, "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    videos = glob.glob(str(tmp_path / "two" / "*.mp4"))
    assert len(videos) == 1 and two.stdout.strip().splitlines()[-1] == videos[0]
    a, b = _frames(next((tmp_path / "one").glob("*.mp4"))), _frames(videos[0])
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 1.0, np.abs(a - b).mean()  # of 255; a broken split gives tens
    record = json.loads(Path(videos[0]).with_name(Path(videos[0]).stem.rsplit("_", 1)[0] + ".json").read_text())
    assert record["transformer"]["context_parallel"].startswith("ulysses over 2 ranks")
    assert len(glob.glob(str(tmp_path / "two" / "*.json"))) == 1


_APP = '''
import sys, time
from dataclasses import replace
import numpy as np
from diffusers_helper.config import Settings
from diffusers_helper.app.startup import engine_provider
from diffusers_helper.app.jobs import JobQueue
from diffusers_helper.pipeline.request import GenerationRequest

if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    s = replace(Settings(), tiny=True, model="tiny", cp_gpus=2, output_dir=sys.argv[1], device="cpu", offline=True)
    provider = engine_provider(s)
    q = JobQueue(provider, outputs_dir=sys.argv[1])
    img = (np.random.RandomState(0).rand(64, 80, 3) * 255).astype("uint8")
    a = q.submit(GenerationRequest(prompt="waves", image=img, seconds=1, steps=3, cache="none"), "tiny")
    b = q.submit(GenerationRequest(prompt="a cat", image=img, seconds=2, steps=20, cache="teacache"), "tiny")
    c = q.submit(GenerationRequest(prompt="a dog", image=img, seconds=1, steps=3), "tiny")
    print("A", q.wait(a, 300).state)
    while (snap := q.get(b)).state == "queued" or (snap.step or 0) < 3:
        time.sleep(0.05)
    q.cancel(b)
    print("B", q.wait(b, 300).state)
    print("C", q.wait(c, 300).state, q.get(c).frames)
    q.close()
    provider.close()
    print("ranks alive", sum(p.is_alive() for p in provider.processes))
'''


def test_app_starts_its_ranks_and_a_stop_reaches_them(tiny_root, tmp_path):
    """FRAMEPACK_CP_GPUS=2 in the app: rank 0 starts rank 1 itself; jobs run on both, a stop in the middle of a
    job stops both ranks at the same step (the next job still runs), and closing ends the other rank."""
    script = tmp_path / "app.py"
    script.write_text(_APP)
    env = dict(os.environ, FRAMEPACK_CACHE_DIR=str(tiny_root.parent), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["A finished", "B cancelled", "C finished 37"], proc.stdout + proc.stderr[-2000:]
    assert lines[-1] == "ranks alive 0"
    assert "Context parallel: 2 ranks started" in proc.stderr
