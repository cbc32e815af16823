"""The web app in a real browser (Debian's chromium driven by Playwright) and through gradio_client."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_lora(tiny_root, path):
    """A rank-2 LoRA on one layer of the tiny transformer, in diffusers' format."""
    import torch
    from safetensors.torch import save_file

    from diffusers_helper.models.loading import load_models
    from diffusers_helper.models.tiny import tiny_spec

    layer = load_models(tiny_spec("tiny", tiny_root), parts=["transformer"]).transformer.transformer_blocks[0].attn.to_q
    g = torch.Generator().manual_seed(0)
    key = "transformer.transformer_blocks.0.attn.to_q"
    save_file({f"{key}.lora_A.weight": torch.randn(2, layer.in_features, generator=g),
               f"{key}.lora_B.weight": torch.randn(layer.out_features, 2, generator=g)}, str(path))


@pytest.fixture(scope="module")
def app_url(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ui-outputs")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEPACK_")}
    loras = tmp_path_factory.mktemp("ui-loras")
    _tiny_lora(tiny_root, loras / "style.safetensors")
    env.update(FRAMEPACK_CACHE_DIR=str(tiny_root.parent), FRAMEPACK_OUTPUT_DIR=str(out), PYTHONUNBUFFERED="1",
               GRADIO_ANALYTICS_ENABLED="False", FRAMEPACK_LORA_DIR=str(loras))
    log = open(out / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "demo_gradio.py", "--tiny", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((out / "app.log").read_text())
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("the app did not start in 120 s:\n" + (out / "app.log").read_text())
    yield url, out
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser, app_url):
    url, _ = app_url
    pg = browser.new_page(viewport={"width": 1400, "height": 1200})
    pg.goto(url)
    pg.wait_for_selector("#start")
    yield pg
    # leave nothing running for the next test
    from gradio_client import Client

    client = Client(url, verbose=False)
    for job in client.predict(api_name="/queue"):
        if job["state"] in ("queued", "running"):
            client.predict(job["job_id"], api_name="/cancel_job")
    pg.close()


def _set_slider(pg, elem_id: str, value) -> None:
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _start(pg, image_file, prompt="a cat walks", seconds=None, steps=None):
    pg.set_input_files("#input-image input[type=file]", str(image_file))
    pg.fill("#prompt textarea", prompt)
    if seconds is not None:
        _set_slider(pg, "seconds", seconds)
    if steps is not None:
        _set_slider(pg, "steps", steps)
    pg.click("#start")


def _status(pg) -> str:
    return pg.inner_text("#status")


def _wait_status(pg, text: str, timeout_s: float = 90) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        s = _status(pg)
        if text in s:
            return s
        time.sleep(0.3)
    raise AssertionError(f"status never showed {text!r}; last: {_status(pg)!r}")


def _video_playable(pg) -> dict:
    pg.wait_for_selector("#result video", timeout=30_000)
    return pg.eval_on_selector("#result video", """v => new Promise(done => {
        const report = () => done({src: v.currentSrc, duration: v.duration, ready: v.readyState});
        if (v.readyState >= 1) report(); else v.addEventListener('loadedmetadata', report, {once: true});
        setTimeout(report, 10000);
    })""")


def test_generate_shows_preview_and_a_playable_video(page, image_file, app_url):
    _start(page, image_file, seconds=2.4, steps=25)
    page.wait_for_selector("#preview img", timeout=60_000)  # the latent preview appears while sampling
    _wait_status(page, "Finished: 73 frames")
    info = _video_playable(page)
    assert info["src"].endswith(".mp4") and info["ready"] >= 1 and info["duration"] > 2.0
    assert page.locator("#progress").inner_text() == ""  # the bar goes away when done
    Path(REPO / "docs").mkdir(exist_ok=True)
    page.screenshot(path=str(app_url[1] / "app.png"), full_page=True)


def test_stop_keeps_finished_sections(page, image_file):
    _start(page, image_file, seconds=20, steps=100)
    _wait_status(page, "section 2/")  # sampling or decoding section 2: section 1 is done
    page.click("#stop")
    status = _wait_status(page, "Stopped", timeout_s=30)
    assert "kept" in status
    info = _video_playable(page)
    assert info["duration"] > 1.0  # at least the first section's frames


def test_reload_reattaches_to_the_running_job(page, image_file, browser, app_url):
    _start(page, image_file, prompt="reload me", seconds=20, steps=100)
    first = _wait_status(page, "section 1/")
    job_id = first.split("job ")[-1].strip()
    page.reload()
    page.wait_for_selector("#start")
    again = _wait_status(page, " section ")
    assert job_id in again
    page.click("#stop")
    _wait_status(page, "Stopped", timeout_s=30)


def test_queue_two_jobs_and_cancel_one(page, image_file, app_url):
    from gradio_client import Client

    _start(page, image_file, prompt="first job", seconds=20, steps=100)
    _wait_status(page, "section 1/")
    page.click("#start")  # same inputs: a second job waits in the queue
    page.wait_for_function("document.querySelector('#queue-table').innerText.includes('queued')", timeout=15_000)
    table = page.inner_text("#queue-table")
    assert "running" in table and "queued" in table
    jobs = Client(app_url[0], verbose=False).predict(api_name="/queue")
    queued_id = next(j["job_id"] for j in jobs if j["state"] == "queued")
    running_id = next(j["job_id"] for j in jobs if j["state"] == "running")
    choice = page.locator("#job-choice input")
    choice.fill(queued_id)
    choice.press("Enter")
    page.click("#cancel-job")
    page.wait_for_function("document.querySelector('#queue-table').innerText.includes('cancelled')",
                           timeout=15_000)
    states = {j["job_id"]: j["state"] for j in Client(app_url[0], verbose=False).predict(api_name="/queue")}
    assert states[queued_id] == "cancelled" and states[running_id] == "running"  # the first job is unaffected
    page.click("#stop")
    _wait_status(page, "Stopped", timeout_s=30)


def test_bad_input_shows_a_message_not_a_trace(page):
    page.fill("#prompt textarea", "no image")
    page.click("#start")
    status = _wait_status(page, "Cannot start")
    assert "no input image" in status and "Traceback" not in page.content()


def test_gallery_reuses_settings(page, image_file):
    _start(page, image_file, prompt="gallery prompt", seconds=1, steps=3)
    _wait_status(page, "Finished")
    page.click("#past")
    page.click("#refresh-gallery")
    page.locator("#gallery .thumbnail-item").first.click(timeout=15_000)
    page.wait_for_function("document.querySelector('#chosen-settings').innerText.includes('gallery prompt')",
                           timeout=15_000)
    page.fill("#prompt textarea", "something else")
    page.click("#reuse")
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'gallery prompt'", timeout=15_000)
    assert page.locator("#steps input[type=number]").input_value() == "3"


def test_gradio_client_api(app_url, image_file):
    from gradio_client import Client, handle_file

    url, out = app_url
    client = Client(url, verbose=False)
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate", "/submit", "/stop", "/cancel_job", "/job_status", "/queue"} <= names
    result = client.predict(image=handle_file(str(image_file)), prompt="api job", seconds=2.4, steps=3,
                            api_name="/generate")
    assert result["state"] == "finished" and result["frames"] == 73
    video = Path(result["video"])
    assert video.is_file() and video.parent == out
    status = client.predict(result["job_id"], api_name="/job_status")
    assert status["state"] == "finished" and status["video"] == result["video"]
    rejected = client.predict(image=handle_file(str(image_file)), prompt="x", seconds=0, api_name="/generate")
    assert rejected["state"] == "rejected" and "video length" in rejected["error"]


def test_api_parameters_are_named_after_the_job_fields(app_url, image_file):
    from gradio_client import Client, handle_file

    from diffusers_helper.config import job_fields

    url, _ = app_url
    client = Client(url, verbose=False)
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    fields = [f.name for f in job_fields()]
    targets = ["end_image", "keyframe_files", "keyframe_times", "extend_video"]  # files, not schema fields: after
    assert [p["parameter_name"] for p in api["/submit"]["parameters"]] == ["image", "model", "prompt",
                                                                          "negative_prompt", *fields, *targets]
    assert [p["parameter_name"] for p in api["/generate"]["parameters"]][4:] == [
        *fields, "end_image", "keyframe_images", "keyframe_times", "extend_video"]
    queued = client.predict(handle_file(str(image_file)), "Tiny (inverted, offline)", prompt="named", seconds=1.0,
                            steps=2, mp4_crf=30, api_name="/submit")
    job_id = queued.split("`")[1]
    done = client.predict(image=handle_file(str(image_file)), prompt="waits", seconds=1.0, steps=1,
                          api_name="/generate")  # the queue runs in order: the submitted job is over by now
    assert done["state"] == "finished"
    status = client.predict(job_id, api_name="/job_status")
    import json

    settings = json.loads(Path(status["sidecar"]).read_text())["settings"]
    assert (settings["prompt"], settings["mp4_crf"], settings["steps"]) == ("named", 30, 2)
    bad = client.predict(image=handle_file(str(image_file)), prompt="x", steps=2.7, api_name="/generate")
    assert bad["state"] == "rejected" and bad["error"] == "steps must be a whole number, got 2.7"


def _raw_call(url: str, api: str, data: list):
    """Call a named endpoint over plain HTTP, as any client can: no gradio_client helping with uploads."""
    import json

    request = urllib.request.Request(f"{url}gradio_api/call/{api}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    body = urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event_id}", timeout=120).read().decode()
    if "event: complete" not in body:
        return None  # refused before our code ran (Gradio's own file checks)
    lines = [line for line in body.splitlines() if line.startswith("data:")]
    return json.loads(lines[-1][5:])


def test_the_api_opens_only_uploaded_files_and_checks_job_ids(app_url, image_file):
    from gradio_client import Client

    from diffusers_helper.config import job_fields

    url, _ = app_url
    values = [{"seconds": 1.0, "steps": 1}.get(f.name, f.default) for f in job_fields()] + [None, None, "", None]
    (result,) = _raw_call(url, "generate", [str(image_file), "x", "", "", *values])  # a plain server path
    assert result["state"] == "rejected" and "must be an uploaded file" in result["error"], result
    assert str(image_file.parent) not in result["error"]
    as_file_data = {"path": str(image_file), "meta": {"_type": "gradio.FileData"}}  # not uploaded: Gradio refuses
    assert _raw_call(url, "generate", [as_file_data, "x", "", "", *values]) is None
    client = Client(url, verbose=False)
    assert client.predict(["a", "list"], api_name="/job_status")["state"] == "unknown"
    assert client.predict("no-such-job", api_name="/cancel_job").startswith("Unknown job")


def _finished_sidecar(outputs: Path, prompt: str, timeout_s: float = 90) -> dict:
    """The sidecar of the finished job with this prompt (the status line may still show an earlier job's end)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for path in sorted(outputs.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                record = json.loads(path.read_text())
            except ValueError:
                continue  # being replaced right now
            if record.get("settings", {}).get("prompt") == prompt and record.get("status") == "finished":
                return record
        time.sleep(0.3)
    raise AssertionError(f"no finished job with the prompt {prompt!r}")


def test_timed_prompt_in_the_browser(page, image_file, app_url):
    """A timed prompt with blending runs from the UI; the sidecar says which prompt each section used."""
    _set_slider(page, "prompt-blend", 1)
    prompt = "[0s: a cat sits]\n[1.2s: the cat stands up]"
    _start(page, image_file, prompt=prompt, seconds=2.4, steps=3)
    record = _finished_sidecar(app_url[1], prompt)
    assert record["settings"]["prompt_blend_sections"] == 1
    assert [[p["text"] for p in row["prompts"]] for row in record["prompt_schedule"]] == [
        ["a cat sits"], ["a cat sits", "the cat stands up"]]
    page.locator("#prompt").screenshot(path=str(app_url[1] / "timed_prompts.png"))


def test_bad_timestamp_in_the_browser_is_one_line(page, image_file):
    time.sleep(2)  # the page's first poll has shown the last job's state: it cannot overwrite the message below
    _start(page, image_file, prompt="[0s: a cat sits] [2x: the cat stands up]", seconds=1, steps=2)
    status = _wait_status(page, "not a time")
    assert "at character 18" in status and "Traceback" not in page.content()


def test_lora_from_the_folder_in_the_browser(page, image_file, app_url):
    """The picker lists the LoRA folder and adds the choice with weight 1; the job records it."""
    page.locator("#lora-pick input").click()
    page.get_by_role("option", name="style.safetensors").click()
    page.wait_for_function("document.querySelector('#loras textarea, #loras input').value === 'style.safetensors:1.0'",
                           timeout=15_000)
    page.fill("#loras textarea, #loras input", "style.safetensors:0.6")
    _start(page, image_file, prompt="a cat with a LoRA", seconds=1, steps=2)
    assert _finished_sidecar(app_url[1], "a cat with a LoRA")["loras"] == [{"file": "style.safetensors", "weight": 0.6}]
    page.screenshot(path=str(app_url[1] / "lora.png"), full_page=True)


def test_api_loras_are_names_not_paths(app_url, image_file):
    from gradio_client import Client, handle_file

    client = Client(app_url[0], verbose=False)
    out = client.predict(image=handle_file(str(image_file)), prompt="x", loras="../../etc/passwd:1",
                         api_name="/generate")
    assert out["state"] == "rejected" and "not a path" in out["error"]


def test_end_image_and_keyframe_in_the_browser(page, image_file, app_url):
    page.click("#targets")  # open the accordion
    page.set_input_files("#end-image input[type=file]", str(image_file))
    page.set_input_files("#keyframe-files input[type=file]", [str(image_file)])
    page.fill("#keyframe-times textarea, #keyframe-times input", "1.2")
    page.wait_for_selector("#end-image img", timeout=15_000)
    _start(page, image_file, prompt="a cat aims", seconds=2.4, steps=2)
    record = _finished_sidecar(app_url[1], "a cat aims")
    assert record["section_targets"] == {"1": "keyframe at 1.2s, ending at 1.2s", "2": "end image, ending at 2.4s"}
    page.locator("#targets").screenshot(path=str(app_url[1] / "keyframes.png"))


def test_api_end_image_and_keyframes(app_url, image_file):
    from gradio_client import Client, handle_file

    client = Client(app_url[0], verbose=False)
    done = client.predict(image=handle_file(str(image_file)), prompt="x", seconds=2.4, steps=2,
                          end_image=handle_file(str(image_file)), keyframe_images=[handle_file(str(image_file))],
                          keyframe_times="1.2", api_name="/generate")
    assert done["state"] == "finished", done
    assert len(json.loads(Path(done["sidecar"]).read_text())["section_targets"]) == 2
    wrong = client.predict(image=handle_file(str(image_file)), prompt="x",
                           keyframe_images=[handle_file(str(image_file))], api_name="/generate")
    assert wrong["state"] == "rejected" and "one time per keyframe image" in wrong["error"]


def test_extend_a_video_in_the_browser(page, app_url, tmp_path):
    from diffusers_helper.media.video import write_mp4

    frames = np.stack([np.full((64, 64, 3), 40 + 4 * t, dtype=np.uint8) for t in range(45)])
    video = write_mp4(frames, tmp_path / "mine.mp4", crf=0)
    page.click("#model label:has-text('F1')")
    page.click("#extend")
    page.set_input_files("#extend-video input[type=file]", str(video))
    page.wait_for_selector("#extend-video video", timeout=15_000)
    page.locator("#extend").screenshot(path=str(app_url[1] / "extend.png"))
    page.fill("#prompt textarea", "and then")
    _set_slider(page, "seconds", 1.2)
    _set_slider(page, "steps", 2)
    page.click("#start")
    record = _finished_sidecar(app_url[1], "and then")
    assert record["frames"] == 81  # 45 of the video, 36 new
    assert record["source_video"] == "mine.mp4" and record["model"] == "tiny-f1"


def test_api_extend_video(app_url, tmp_path):
    from gradio_client import Client, handle_file

    from diffusers_helper.media.video import write_mp4

    frames = np.stack([np.full((64, 64, 3), 90, dtype=np.uint8)] * 45)
    video = write_mp4(frames, tmp_path / "api.mp4", crf=0)
    client = Client(app_url[0], verbose=False)
    done = client.predict(prompt="more", model="Tiny F1 (offline)", extend_video=handle_file(str(video)), seconds=1.2,
                          steps=2, api_name="/generate")
    assert done["state"] == "finished" and done["frames"] == 81, done


def test_extend_a_past_video_from_the_gallery(page, image_file, app_url):
    _start(page, image_file, prompt="to be continued", seconds=1.2, steps=2)
    _finished_sidecar(app_url[1], "to be continued")
    page.click("#past")
    page.click("#refresh-gallery")
    page.locator("#gallery .thumbnail-item").first.click(timeout=15_000)
    page.wait_for_function("document.querySelector('#chosen-settings').innerText.includes('to be continued')",
                           timeout=15_000)
    page.click("#extend-past")
    page.wait_for_selector("#extend-video video", timeout=15_000)
    page.fill("#prompt textarea", "continued")
    page.click("#start")
    status = _wait_status(page, "Finished: 73 frames")  # 37 frames of the past video, 36 new
    assert "Traceback" not in page.content() and status
