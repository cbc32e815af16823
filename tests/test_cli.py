"""The headless CLI: a real run prints the MP4 path; bad input is one line and exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from diffusers_helper.generate import main


def _env(tiny_root, **extra):
    env = dict(os.environ, FRAMEPACK_CACHE_DIR=str(tiny_root.parent), PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def test_cli_generates_and_prints_mp4(tiny_root, tmp_path, image_file):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "diffusers_helper.generate", "--image", str(image_file), "--prompt", "waves",
         "--model", "tiny-f1", "--seconds", "1", "--steps", "2", "--output", str(out), "--offline"],
        capture_output=True, text=True, env=_env(tiny_root), cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.suffix == ".mp4" and path.parent == out
    assert "section 1/1" in proc.stderr  # progress bar description


def _bad(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("extra, message", [
    (["--seconds", "0"], "video length"),
    (["--seconds", "-2"], "video length"),
    (["--steps", "0"], "steps must be"),
    (["--steps", "-3"], "steps must be"),
    (["--model", "sdxl"], "unknown model 'sdxl'"),
    (["--device", "quantum"], "device 'quantum' is not a device"),
    (["--prompt", "[0s: a cat] [2x: it stands]"], "timed prompt: '2x' is not a time"),
    (["--prompt-blend-sections", "9"], "prompt blending must be between 0 and 8"),
])
def test_bad_numbers_and_model(capsys, tmp_path, image_file, extra, message):
    code, err = _bad(capsys, ["--image", str(image_file), "--prompt", "x", "--model", "tiny",
                              "--output", str(tmp_path / "o"), *extra])
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_argparse_errors_are_one_line_exit_2(capsys, image_file):
    with pytest.raises(SystemExit) as info:
        main(["--image", str(image_file), "--prompt", "x", "--steps", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid int value" in err


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.png", "image file not found"),
    (lambda p: (p / "notes.txt").write_text("hello") and p / "notes.txt", "not a readable image"),
    (lambda p: p, "not a file"),
])
def test_bad_image_files(capsys, tmp_path, make, message):
    path = make(tmp_path)
    code, err = _bad(capsys, ["--image", str(path), "--prompt", "x", "--model", "tiny",
                              "--output", str(tmp_path / "o")])
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_missing_weights_offline(tmp_path, image_file):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("FRAMEPACK_MODELS_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "diffusers_helper.generate", "--image", str(image_file), "--prompt", "x",
         "--model", "framepack", "--output", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 2
    err_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and "offline" in err_lines[0].lower(), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()

