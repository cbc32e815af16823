"""The sampler and section loop reproduce the original FramePack's latents on the shared fixture."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURE_DIR
from diffusers_helper import parity

pytestmark = pytest.mark.skipif(not FIXTURE_DIR.is_dir(), reason="shared parity fixture not present")


def test_fixture_parity_both_modes(capsys):
    assert parity.main([str(FIXTURE_DIR)]) == 0
    out = capsys.readouterr().out
    # every expected tensor of both cases was compared
    for case in ("inverted_3sec", "f1_3sec"):
        for name in ("section_0", "section_1", "section_2", "history_latents"):
            line = next(l for l in out.splitlines() if case in l and f"expected.{name}" in l)
            assert line.endswith("ok"), line
            assert float(line.split("rel_l2=")[1].split()[0]) < 1e-4


def test_parity_detects_a_wrong_result(tmp_path):
    root = tmp_path / "fixture"
    shutil.copytree(FIXTURE_DIR, root)
    path = root / "f1_3sec.safetensors"
    tensors = load_file(str(path))
    tensors["expected.section_1"] = tensors["expected.section_1"] * 1.001
    save_file(tensors, str(path))
    assert parity.main([str(root)]) == 1


def test_parity_rejects_a_folder_without_cases(tmp_path, capsys):
    assert parity.main([str(tmp_path)]) == 2
    assert "cases.json" in capsys.readouterr().err


def test_relative_l2():
    a = torch.ones(10)
    assert parity.relative_l2(a, a) == 0
    assert parity.relative_l2(a * 1.5, a) == pytest.approx(0.5)
