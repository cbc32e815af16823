"""One declaration of the per-job controls: validation, the CLI, the web app's widgets and --help follow it."""

import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from diffusers_helper.config import Settings, job_fields, load_settings
from diffusers_helper.pipeline.request import GenerationRequest, InputError

IMAGE = np.zeros((64, 64, 3), np.uint8)


@pytest.mark.parametrize("changes, message", [
    (dict(steps=2.7), "steps must be a whole number, got 2.7"),
    (dict(steps="abc"), "steps must be a number, got 'abc'"),
    (dict(seed=[1, 2]), "seed must be a number, got list"),
    (dict(seconds=0.5), "video length must be between 1 and 120 seconds, got 0.5"),
    (dict(gs=0.5), "distilled CFG must be between 1 and 32, got 0.5"),
    (dict(cfg=float("nan")), "CFG must be a finite number"),
    (dict(cache="fast"), "step cache must be one of none, teacache, magcache, fbcache, taylorseer"),
    (dict(resolution=32), "resolution must be 0 (the model's own) or between 64 and 2048"),
])
def test_validation_comes_from_the_schema(changes, message):
    with pytest.raises(InputError) as info:
        GenerationRequest(prompt="x", image=IMAGE, **changes).validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_values_are_coerced_to_their_declared_types():
    req = GenerationRequest(prompt="x", image=IMAGE, steps=3.0, seed="12", seconds=2).validate()
    assert (req.steps, req.seed, req.seconds) == (3, 12, 2.0)
    assert type(req.steps) is int and type(req.seconds) is float
    assert set(req.to_record()) == {f.name for f in job_fields()} | {"prompt", "negative_prompt"}  # the sidecar


def test_every_job_control_is_a_setting_flag_and_a_cli_flag(tmp_path):
    from diffusers_helper.generate import build_parser

    parser = build_parser()
    cli_flags = {opt for a in parser._actions for opt in a.option_strings}
    for f in job_fields():
        m = f.metadata
        assert m["env"] and m["flags"] and set(m["flags"]) <= cli_flags, f.name
        assert getattr(Settings(), f.name) == f.default  # the settings start from the schema's default
    loaded = load_settings(["--steps", "7"], env={"FRAMEPACK_VIDEO_LENGTH": "3"}, cwd=tmp_path).settings
    args = build_parser(loaded).parse_args(["--image", "i.png", "--prompt", "p"])
    assert (args.steps, args.seconds) == (7, 3.0)  # the CLI's defaults are the settings'


def test_widgets_take_label_limits_and_step_from_the_schema():
    import gradio as gr

    import demo_gradio

    for f in job_fields():
        m = f.metadata
        with gr.Blocks():
            widget = demo_gradio.job_widget(f, f.default, cache="teacache")
        # a cache's own knobs show only with their cache
        shown = m["section"] != "hidden" and m["shown_with"] in (None, "teacache")
        assert widget.label == m["label"] and widget.visible == shown, f.name
        if m["choices"]:
            assert [v for _, v in widget.choices] == list(m["choices"])
        elif m["widget"] == "text":
            assert isinstance(widget, gr.Textbox), f.name
        elif f.type != "bool":
            assert (widget.minimum, widget.maximum) == (m["min"], m["max"]), f.name
    assert demo_gradio.MAX_SEED == 2**32 - 1


def _page(tmp_path, **defaults):
    import demo_gradio

    app = demo_gradio.App(queue=None, outputs_dir=tmp_path, model_labels={"Tiny": "tiny"},
                          defaults=Settings(**defaults))
    return demo_gradio.build_app(app)


def test_the_page_and_its_api_follow_the_schema(tmp_path):
    """The built page (not just the widget helper): one widget per field with the schema's label, limits and
    section, starting at the server's settings; the API's parameters are the field names with those defaults."""
    import gradio as gr

    page = _page(tmp_path, steps=7, cfg=2.0)
    by_label = {}
    for block in page.blocks.values():
        by_label.setdefault(getattr(block, "label", None), []).append(block)
    for f in job_fields():
        m = f.metadata
        [widget] = by_label[m["label"]]
        shown = m["section"] != "hidden" and m["shown_with"] in (None, "teacache")  # the default cache's knobs
        assert widget.visible == shown, f.name
        assert widget.value == {"steps": 7, "cfg": 2.0}.get(f.name, f.default), f.name
        if m["choices"]:
            assert [v for _, v in widget.choices] == list(m["choices"]), f.name
        elif m["widget"] == "text":
            assert isinstance(widget, gr.Textbox), f.name
        elif f.type != "bool":
            assert (widget.minimum, widget.maximum) == (m["min"], m["max"]), f.name
            if m["step"]:
                assert widget.step == m["step"], f.name
    assert [w.visible for w in by_label["Negative prompt"]] == [True]  # CFG 2 > 1
    api = page.get_api_info()["named_endpoints"]
    names = [f.name for f in job_fields()]
    for endpoint, first, images in (
            ("/submit", ["image", "model", "prompt", "negative_prompt"], ["end_image", "keyframe_files"]),
            ("/generate", ["image", "prompt", "model", "negative_prompt"], ["end_image", "keyframe_images"])):
        params = api[endpoint]["parameters"]
        assert [p["parameter_name"] for p in params] == first + names + images + ["keyframe_times", "extend_video"], \
            endpoint
        defaults = {p["parameter_name"]: p["parameter_default"] for p in params}
        assert (defaults["steps"], defaults["cfg"], defaults["seed"]) == (7, 2.0, 31337), endpoint


def test_reuse_restores_every_control_from_a_sidecar(tmp_path):
    page = _page(tmp_path)
    fn = next(fn for fn in page.fns.values() if fn.api_name == "on_reuse")
    settings = {"prompt": "again", "negative_prompt": "blurry"}
    for f in job_fields():  # a value other than the default for every field
        m = f.metadata
        settings[f.name] = (not f.default) if f.type == "bool" else m["max"]
    values = fn.fn({"settings": settings, "model": "tiny"})
    restored = {getattr(c, "label", None): v for c, v in zip(fn.outputs, values)}
    assert restored["Model"] == "Tiny" and restored["Prompt"] == "again" and restored["Negative prompt"] == "blurry"
    assert all(restored[f.metadata["label"]] == settings[f.name] for f in job_fields())


def test_help_prints_usage_fast_without_loading_anything():
    for cmd in ([sys.executable, "demo_gradio.py", "--help"], ["bash", "start.sh", "--help"]):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and time.perf_counter() - t0 < 10, proc.stderr
        assert "usage: python demo_gradio.py" in proc.stdout and "--seconds" in proc.stdout
    for run in ("runpy.run_path('demo_gradio.py', run_name='__main__')",
                "runpy.run_module('diffusers_helper.generate', run_name='__main__')"):
        probe = (f"import sys, runpy; sys.argv = ['x', '--help']\ntry:\n    {run}\nexcept SystemExit:\n    pass\n"
                 "print(sorted(m for m in ('torch', 'gradio', 'diffusers') if m in sys.modules))")
        proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert "usage:" in proc.stdout and proc.stdout.strip().endswith("[]"), (run, proc.stdout[-300:], proc.stderr)


def test_the_status_line_changes_only_when_the_job_does(tmp_path):
    """A message such as 'Cannot start: ...' must not be overwritten by the next poll of an unchanged job."""
    from dataclasses import replace

    import demo_gradio
    from diffusers_helper.app.jobs import FINISHED, JobSnapshot

    snap = JobSnapshot(job_id="j1", model="tiny", prompt="p", state=FINISHED, stage="Finished: 37 frames")

    class Queue:
        current = snap

        def latest(self, viewer=None):
            return self.current

        def jobs(self, viewer=None):
            return [self.current]

    queue = Queue()
    app = demo_gradio.App(queue=queue, outputs_dir=tmp_path, model_labels={"Tiny": "tiny"})
    seen = {}
    first = demo_gradio.render(app, seen)[2]
    again = demo_gradio.render(app, seen)[2]
    queue.current = replace(snap, version=1, stage="Finished: 73 frames")
    changed = demo_gradio.render(app, seen)[2]
    assert "Finished: 37 frames" in first and again == {"__type__": "update"} and "73 frames" in changed
