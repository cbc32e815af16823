"""A shared server: sign-in, each user's own jobs, an admin who sees all, an upload limit, loud warnings."""


import numpy as np
import pytest
from PIL import Image

from conftest import start_app
from diffusers_helper.app.access import credentials, exposure_warning
from diffusers_helper.app.jobs import ALL, JobQueue
from diffusers_helper.config import SettingsError
from diffusers_helper.pipeline.request import GenerationRequest


def test_credentials_from_the_setting_and_a_file(tmp_path):
    file = tmp_path / "users.txt"
    file.write_text("# comment\ncarol:three\n\n")
    assert credentials("alice:one, bob:two:with:colons", str(file)) == [
        ("alice", "one"), ("bob", "two:with:colons"), ("carol", "three")]
    with pytest.raises(SettingsError, match="expected user:password") as info:
        credentials("alice")
    assert "alice" not in str(info.value).split(":", 1)[1]  # nothing of the entry is echoed
    with pytest.raises(SettingsError, match="cannot read"):
        credentials("", str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("server, share, signed_in, warns", [
    ("127.0.0.1", False, False, False), ("localhost", False, False, False), ("::1", False, False, False),
    ("0.0.0.0", False, False, True), ("192.168.1.5", False, False, True), ("127.0.0.1", True, False, True),
    ("0.0.0.0", True, True, False),
])
def test_a_loud_warning_when_reachable_without_sign_in(server, share, signed_in, warns):
    assert (exposure_warning(server, share, signed_in) is not None) == warns


def test_each_user_sees_only_their_own_jobs(tmp_path):
    class Idle:
        def get(self, model, progress=None):
            raise RuntimeError("no models in this test")

    queue = JobQueue(Idle())
    image = np.zeros((64, 64, 3), np.uint8)
    try:
        a = queue.submit(GenerationRequest(prompt="a", image=image), "tiny", owner="alice")
        b = queue.submit(GenerationRequest(prompt="b", image=image), "tiny", owner="bob")
        queue.wait(b, 30)
        assert [j.job_id for j in queue.jobs("alice")] == [a] and [j.job_id for j in queue.jobs(ALL)] == [a, b]
        assert queue.get(a, "bob") is None and queue.get(a, "alice").owner == "alice"
        assert queue.latest("bob").job_id == b
    finally:
        queue.close()


def test_two_users_and_an_admin_through_the_api(tiny_root, tmp_path, image_file):
    from gradio_client import Client, handle_file

    from test_ui import _free_port

    out = tmp_path / "outputs"
    out.mkdir()
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)).save(big)
    proc, url, log = start_app(out, _free_port(), tiny_root.parent, FRAMEPACK_AUTH="alice:a-pass,bob:b-pass,root:r-pass",
                               FRAMEPACK_ADMIN_USERS="root", FRAMEPACK_MAX_UPLOAD_MB="1")
    try:
        alice = Client(url, auth=("alice", "a-pass"), verbose=False)
        bob = Client(url, auth=("bob", "b-pass"), verbose=False)
        root = Client(url, auth=("root", "r-pass"), verbose=False)
        done = alice.predict(image=handle_file(str(image_file)), prompt="alice's", seconds=1.0, steps=1,
                             api_name="/generate")
        assert done["state"] == "finished"
        job = done["job_id"]
        assert [j["job_id"] for j in alice.predict(api_name="/queue")] == [job]
        assert bob.predict(api_name="/queue") == []
        assert bob.predict(job, api_name="/job_status")["state"] == "unknown"
        assert bob.predict(job, api_name="/cancel_job").startswith("Unknown job")
        assert bob.predict(api_name="/stop") == "Nothing is running."
        assert [j["job_id"] for j in root.predict(api_name="/queue")] == [job]  # the admin sees every job
        with pytest.raises(Exception):
            Client(url, auth=("alice", "wrong"), verbose=False)
        with pytest.raises(Exception) as too_big:
            bob.predict(image=handle_file(str(big)), prompt="too big", api_name="/generate")  # over 1 MB
        assert "exceeds the maximum file size" in str(too_big.value)
        assert bob.predict(api_name="/queue") == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "Sign-in on for 3 user(s); admins: root" in log.read_text()
    import json

    assert json.loads((out / f"{job}.json").read_text())["owner"] == "alice"
