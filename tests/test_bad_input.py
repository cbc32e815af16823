"""Bad input of any kind gets one clear line, never a traceback, and never tells a client about server files."""

import json
import struct
import zlib

import pytest

from diffusers_helper.app.jobs import past_jobs
from diffusers_helper.app.startup import output_dir_problem, server_problem
from diffusers_helper.config import SettingsError, load_settings
from diffusers_helper.pipeline.request import InputError, load_image


def _png_header(width: int, height: int) -> bytes:
    """A PNG that only claims its size: signature, IHDR, IEND (69 bytes with an empty IDAT)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(100_000, 100_000), (20_000, 20_000)])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(*size))
    with pytest.raises(InputError, match="image is too large") as info:
        load_image(path)
    assert "\n" not in str(info.value)


def test_image_errors_name_the_file_not_its_folder(tmp_path):
    secret = tmp_path / "secret-folder"
    secret.mkdir()
    (secret / "notes.txt").write_text("hello")
    for path in (secret / "missing.png", secret / "notes.txt", secret):
        with pytest.raises(InputError) as info:
            load_image(path)
        assert "secret-folder" not in str(info.value) or path == secret


def test_the_gallery_lists_only_videos_inside_the_outputs_folder(tmp_path, caplog):
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "good_37.mp4").write_bytes(b"video")
    outside = tmp_path / "private.txt"
    outside.write_text("not yours")
    records = {"good": str(out / "good_37.mp4"), "escape": str(outside), "relative": "../private.txt",
               "missing": str(out / "gone.mp4")}
    for name, video in records.items():
        (out / f"{name}.json").write_text(json.dumps({"status": "finished", "video": video, "job_id": name,
                                                      "settings": {"prompt": name}}))
    (out / "garbage.json").write_text("[1, 2")
    (out / "list.json").write_text("[1, 2]")
    with caplog.at_level("WARNING"):
        listed = past_jobs(out)
    assert [r["job_id"] for r in listed] == ["good"]
    assert "skipping escape.json" in caplog.text and "skipping relative.json" in caplog.text


def test_config_files_binary_or_with_a_key_set_twice(tmp_path):
    (tmp_path / "config.yaml").write_bytes(b"\x00\x01\xff\xfe binary")
    with pytest.raises(SettingsError, match="is not a text file"):
        load_settings([], env={}, cwd=tmp_path)
    (tmp_path / "config.yaml").write_text("memory:\n  steps: 3\nmodel:\n  steps: 4\n")
    loaded = load_settings([], env={}, cwd=tmp_path)
    assert loaded.settings.steps == 4
    assert any("steps is set twice (memory.steps and model.steps)" in w for w in loaded.warnings)


def test_output_folder_and_server_address_are_checked_before_anything_loads(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")
    assert "is a file" in output_dir_problem(str(file))
    assert "cannot be created" in output_dir_problem(str(file / "sub"))
    assert output_dir_problem(str(tmp_path / "new" / "folder")) is None
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert "not a host name" in server_problem("not.a.host")
    assert server_problem("127.0.0.1") is None
