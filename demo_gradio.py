"""FramePack web app: an image and a prompt in, a video out, section by section.

    python demo_gradio.py            # real models (downloaded once, ~30 GB)
    python demo_gradio.py --tiny     # small random models built locally, works offline

Jobs go into a server-side queue; the page polls it once a second, so a reload reattaches to the
running job. The UI only turns job snapshots into widget updates; tensors stay in diffusers_helper.
Every setting flag of `python -m diffusers_helper.settings --help` works here too.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # usage before gradio, torch and the models load
    from diffusers_helper.config.load import build_parser

    build_parser(prog="python demo_gradio.py", description=__doc__.split("\n\n")[0]).print_help()
    sys.exit(0)

import inspect  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData
from gradio.utils import get_upload_folder  # where Gradio stores every uploaded file

from diffusers_helper.app.forms import add_lora, keyframes_from, progress_html, queue_rows, status_text
from diffusers_helper.app.gpu_stats import gpu_status
from diffusers_helper.config.loras import LoraError, available_loras, names_only
from diffusers_helper.app.access import credentials, exposure_warning, inside
from diffusers_helper.app.jobs import ALL, ENDED, QUEUED, RUNNING, JobQueue, JobSnapshot, past_jobs
from diffusers_helper.models.loading import WeightsMissingError
from diffusers_helper.pipeline.request import GenerationRequest, InputError
from diffusers_helper.config import Settings, job_defaults, job_fields
from diffusers_helper.config.job import CACHE_LABELS, python_type
from diffusers_helper.app.startup import engine_provider, model_name, start

log = logging.getLogger("framepack.app")

QUICK_PROMPTS = [
    "The girl dances gracefully, with clear movements, full of charm.",
    "A character doing some simple body movements.",
    "The camera slowly pushes in while the subject turns their head and smiles.",
]
MAX_SEED = next(f.metadata["max"] for f in job_fields() if f.name == "seed")
CSS = """
.fp-progress {margin: 4px 0}
.fp-label {font-size: 0.9em; margin-bottom: 4px}
.fp-track {width: 100%; height: 10px; background: #e5e7eb; border-radius: 5px; overflow: hidden}
.fp-bar {height: 100%; background: #2563eb; transition: width 0.3s}
"""
@dataclass
class App:
    """Server-side state shared by every browser tab: one queue, one engine provider."""

    queue: JobQueue
    outputs_dir: Path
    model_labels: dict[str, str]  # label -> model name
    defaults: Settings = field(default_factory=Settings)
    signed_in: bool = False  # sign-in on: each user sees and cancels only their own jobs
    admins: frozenset = frozenset()

    def label_of(self, model: str) -> str:
        return next((label for label, name in self.model_labels.items() if name == model), model)

    def request(self, image, values: dict, end_image=None, keyframes=(), extend_video=None) -> GenerationRequest:
        """Values by field name; a missing control takes the server's default. Types and ranges are checked by
        `GenerationRequest.validate`, from the job schema."""
        d = default_values(self.defaults)
        if image is not None and extend_video is not None:
            raise InputError("give an image or a video to extend, not both")
        return GenerationRequest(image=image, end_image=end_image, keyframes=list(keyframes),
                                 extend_video=extend_video,
                                 **{name: d[name] if values.get(name) is None else values[name] for name in d})

    def viewer(self, request) -> object:
        """Whose jobs this request may see: every job without sign-in or for an admin, else its user's."""
        if not self.signed_in:
            return ALL
        user = getattr(request, "username", None)
        return ALL if user in self.admins else user

    def submit(self, image, model_label: str, values: dict, owner: str | None = None, end_image=None,
               keyframes=(), extend_video=None) -> str:
        """Enqueue; returns the job id or raises InputError with a one-line message."""
        model = self.model_labels.get(model_label)
        if model is None:
            raise InputError(f"unknown model {model_label!r}; choose one of {', '.join(self.model_labels)}")
        request = self.request(image, values, end_image, keyframes, extend_video)
        try:
            names_only(request.loras)  # clients choose LoRAs by name from the LoRA folder, never by path
        except LoraError as exc:
            raise InputError(str(exc)) from None
        return self.queue.submit(request, model, owner)


# -- rendering (pure functions of snapshots, so they are easy to test) --------------------------------------


def default_values(d: Settings) -> dict:
    """The job controls' starting values, by GenerationRequest field name."""
    return {"prompt": "", "negative_prompt": "", **job_defaults(d)}


def job_widget(f, value, cache: str = ""):
    """The widget of one job field, from its declaration: label, help, limits, step. A step cache's knob shows
    only while that cache is chosen."""
    m = f.metadata
    visible = m["section"] != "hidden" and (m["shown_with"] is None or m["shown_with"] == cache)
    common = dict(label=m["label"], value=value, elem_id=m["elem_id"] or f.name.replace("_", "-"), visible=visible)
    if m["choices"]:
        return gr.Dropdown(choices=[(CACHE_LABELS.get(c, c), c) for c in m["choices"]], info=m["help"], **common)
    if f.type == "bool":
        return gr.Checkbox(info=m["help"], **common)
    if m["widget"] == "text":
        return gr.Textbox(info=m["help"], lines=1, **common)
    if m["widget"] == "number":
        return gr.Number(precision=0 if f.type == "int" else None, minimum=m["min"], maximum=m["max"], **common)
    step = m["step"] or (1 if f.type == "int" else 0.01)
    return gr.Slider(minimum=m["min"], maximum=m["max"], step=step, info=m["help"], **common)


def with_signature(fn, params: list[inspect.Parameter], returns=dict):
    """`fn(**values)` behind a signature naming every parameter, so the API lists them by name."""
    sig = inspect.Signature(params, return_annotation=returns)

    def named(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return fn(**bound.arguments)

    named.__signature__ = sig
    named.__annotations__ = {**{p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty},
                             "return": returns}
    named.__name__, named.__doc__ = fn.__name__, fn.__doc__
    return named


def render(app: App, seen: dict, viewer=ALL):
    """One poll: updates for video, preview, status, progress, GPU, queue table, job choices, buttons.

    The job choice keeps the user's pick while that job is still open."""
    snap = app.queue.latest(viewer)
    jobs = app.queue.jobs(viewer)
    unchanged = gr.update()
    video = preview = unchanged
    if snap is not None and snap.video and snap.video != seen.get("video"):
        video = snap.video
        seen["video"] = snap.video
    if snap is not None and snap.preview is not None and (snap.job_id, snap.version) != seen.get("preview"):
        preview = snap.preview
        seen["preview"] = (snap.job_id, snap.version)
    if snap is not None and snap.state in ENDED and seen.get("cleared") != snap.job_id:
        preview = None
        seen["cleared"] = snap.job_id
    running = snap is not None and snap.state == RUNNING
    bar = progress_html(snap.fraction, snap.stage) if running else ""
    open_jobs = [j.job_id for j in jobs if j.state in (QUEUED, RUNNING)]
    choice = gr.update() if open_jobs == seen.get("open") else gr.update(choices=open_jobs,
                                                                         value=open_jobs[-1] if open_jobs else None)
    seen["open"] = open_jobs
    # the status line changes only when the job does, so a message such as "Cannot start: ..." stays readable
    state = (snap.job_id, snap.version) if snap is not None else None
    status = gr.update() if state == seen.get("status_of") and "status_of" in seen else status_text(snap)
    seen["status_of"] = state
    return (video, preview, status, bar, gpu_status(), queue_rows(jobs), choice,
            gr.update(), gr.update(interactive=running), seen)  # Start stays on: more jobs queue up


def gallery_items(app: App, viewer=ALL) -> tuple[list, list[dict]]:
    records = past_jobs(app.outputs_dir, viewer=viewer)
    return [(r["video"], f"{r.get('job_id', '')}: {str(r['settings'].get('prompt', ''))[:40]}") for r in records], records


# -- the page --------------------------------------------------------------------------------------------------


def build_app(app: App) -> gr.Blocks:
    d = app.defaults
    labels = list(app.model_labels)
    with gr.Blocks(title="FramePack") as page:
        gr.Markdown("# FramePack\nTurn an image and a prompt into a video, one section at a time.")
        seen = gr.State({})
        records = gr.State([])
        with gr.Row():
            with gr.Column():
                image = gr.Image(sources=["upload"], type="filepath", label="Image", height=320,
                                 elem_id="input-image")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    info="Timed prompts change over the video: "
                                         "[0s: a cat sits] [2s: the cat stands up]")
                quick = gr.Dataset(samples=[[p] for p in QUICK_PROMPTS], label="Quick prompts", components=[prompt])
                quick.click(lambda x: x[0], inputs=[quick], outputs=prompt, show_progress="hidden", queue=False,
                            api_visibility="private")
                with gr.Row():
                    start_btn = gr.Button("Start Generation", variant="primary", elem_id="start")
                    stop_btn = gr.Button("End Generation", interactive=False, elem_id="stop")
                model = gr.Radio(labels, value=labels[0], label="Model", elem_id="model")
                controls = {}
                with gr.Group():
                    for f in job_fields():
                        if f.metadata["section"] == "performance":
                            continue
                        if f.name == "seed":
                            negative = gr.Textbox(label="Negative prompt", value="", visible=d.cfg > 1.0)
                            with gr.Row():
                                controls["seed"] = job_widget(f, d.seed)
                                randomize = gr.Button("Random seed", size="sm")
                        else:
                            controls[f.name] = job_widget(f, getattr(d, f.name), d.cache)
                        if f.name == "loras":
                            lora_pick = gr.Dropdown(choices=available_loras(d.lora_dir), value=None,
                                                    label="Add a LoRA",
                                                    info="from the LoRA folder (FRAMEPACK_LORA_DIR)",
                                                    elem_id="lora-pick")
                with gr.Accordion("End frame and keyframes (FramePack model only)", open=False, elem_id="targets"):
                    targets = {
                        "end_image": gr.Image(sources=["upload"], type="filepath", label="End image", height=200,
                                              elem_id="end-image"),
                        "keyframe_files": gr.File(file_count="multiple", file_types=["image"], type="filepath",
                                                  label="Keyframe images", elem_id="keyframe-files"),
                        "keyframe_times": gr.Textbox(value="", label="Keyframe times (seconds)",
                                                     info="one per keyframe image, in the same order: 1.2, 3.6",
                                                     elem_id="keyframe-times"),
                    }
                    gr.Markdown("The F1 model generates forward from the start image and uses neither. A keyframe is "
                                "reached at the end of the section nearest its time (1.2 s sections by default).")
                with gr.Accordion("Extend a video (F1 model)", open=False, elem_id="extend") as extend_panel:
                    targets["extend_video"] = gr.Video(sources=["upload"], label="Video to continue (instead of an "
                                                       "image)", elem_id="extend-video")
                with gr.Accordion("Performance Tuning", open=False, elem_id="performance"):
                    for f in job_fields():
                        if f.metadata["section"] == "performance":
                            controls[f.name] = job_widget(f, getattr(d, f.name))
            with gr.Column():
                preview = gr.Image(label="Next latents", height=200, interactive=False, elem_id="preview")
                result = gr.Video(label="Finished frames", autoplay=True, loop=True, height=512, interactive=False,
                                  elem_id="result")
                status = gr.Markdown(status_text(None), elem_id="status")
                bar = gr.HTML("", elem_id="progress")
                gpu = gr.Markdown(gpu_status(), elem_id="gpu")
                with gr.Accordion("Queue", open=True, elem_id="queue"):
                    table = gr.Dataframe(headers=["job", "state", "model", "prompt", "progress", "worker"],
                                         interactive=False, elem_id="queue-table", value=[])
                    with gr.Row():
                        job_choice = gr.Dropdown(label="Queued or running job", choices=[], elem_id="job-choice",
                                                 allow_custom_value=True)
                        cancel_btn = gr.Button("Cancel job", elem_id="cancel-job")
                with gr.Accordion("Past videos", open=False, elem_id="past"):
                    gallery = gr.Gallery(label="Outputs", columns=3, height=300, elem_id="gallery")
                    chosen = gr.JSON(label="Settings of the selected video", elem_id="chosen-settings")
                    with gr.Row():
                        refresh_btn = gr.Button("Refresh", elem_id="refresh-gallery")
                        reuse_btn = gr.Button("Reuse these settings", elem_id="reuse")
                        extend_btn = gr.Button("Extend this video (F1)", elem_id="extend-past")

        named = {"prompt": prompt, "negative_prompt": negative, **controls}  # API parameters: the field names

        def on_start(image, model, request: gr.Request, end_image=None, keyframe_files=None, keyframe_times="",
                     extend_video=None, **values):
            """Queue a job with every control; returns at once with the job id (or why it cannot start)."""
            try:
                keyframes = keyframes_from(keyframe_times, keyframe_files)
                job_id = app.submit(image, model, values, _owner(app, request), end_image, keyframes, extend_video)
            except InputError as exc:
                gr.Warning(str(exc))
                return f"**Cannot start:** {exc}"
            return f"Queued job `{job_id}`"

        def on_stop(request: gr.Request):
            stopped = app.queue.cancel_running(app.viewer(request))
            return "Stopping after the current step..." if stopped else "Nothing is running."

        def on_cancel(job_id, request: gr.Request):
            if not job_id:
                return "Choose a job to cancel."
            if not isinstance(job_id, str) or app.queue.get(job_id, app.viewer(request)) is None:
                return f"Unknown job `{str(job_id)[:64]}`."  # another user's job is unknown to this one
            return f"Cancelled job `{job_id}`." if app.queue.cancel(job_id) else f"Job `{job_id}` already ended."

        def on_refresh(request: gr.Request):
            items, recs = gallery_items(app, app.viewer(request))
            return items, recs

        def on_tick(s, request: gr.Request):
            return render(app, s, app.viewer(request))

        def on_select(recs, evt: gr.SelectData):
            return recs[evt.index] if recs and evt.index is not None and evt.index < len(recs) else None

        def on_reuse(record):
            if not record:
                gr.Warning("Select a past video first.")
                return [gr.update()] * (len(named) + 1)
            s = record.get("settings", {})
            return [*(s.get(name, gr.update()) for name in named), app.label_of(record.get("model", ""))]

        def on_extend(record):
            """The selected past video becomes the video to continue, with the F1 model and no start image."""
            if not record or not record.get("video"):
                gr.Warning("Select a past video first.")
                return gr.update(), gr.update(), gr.update(), gr.update()
            f1 = next((label for label, name in app.model_labels.items() if "f1" in name), gr.update())
            return record["video"], f1, None, gr.update(open=True)

        start_btn.click(on_start, inputs=[image, model], inputs_kwargs={**named, **targets}, outputs=status,
                        api_name="submit", show_progress="hidden")
        extend_btn.click(on_extend, inputs=chosen, outputs=[targets["extend_video"], model, image, extend_panel],
                         api_visibility="private")
        stop_btn.click(on_stop, outputs=status, api_name="stop", show_progress="hidden")
        cancel_btn.click(on_cancel, inputs=job_choice, outputs=status, api_name="cancel_job", show_progress="hidden")
        controls["cfg"].change(lambda v: gr.update(visible=v > 1.0), inputs=controls["cfg"], outputs=negative,
                               queue=False, api_visibility="private")  # the negative prompt matters only with CFG
        knobs = [f for f in job_fields() if f.metadata["shown_with"]]
        controls["cache"].change(lambda c: [gr.update(visible=f.metadata["shown_with"] == c) for f in knobs],
                                 inputs=controls["cache"], outputs=[controls[f.name] for f in knobs], queue=False,
                                 api_visibility="private")  # each cache's own knobs, under the choice
        randomize.click(lambda: random.randint(0, MAX_SEED), outputs=controls["seed"], queue=False,
                        api_visibility="private")
        lora_pick.select(add_lora, inputs=[controls["loras"], lora_pick], outputs=[controls["loras"], lora_pick],
                         queue=False, api_visibility="private")
        refresh_btn.click(on_refresh, outputs=[gallery, records], api_visibility="private")
        gallery.select(on_select, inputs=records, outputs=chosen, api_visibility="private")
        reuse_btn.click(on_reuse, inputs=chosen, outputs=[*named.values(), model], api_visibility="private")
        timer = gr.Timer(1.0)
        timer.tick(on_tick, inputs=seen,
                   outputs=[result, preview, status, bar, gpu, table, job_choice, start_btn, stop_btn, seen],
                   show_progress="hidden", concurrency_limit=None, api_visibility="private")
        page.load(on_refresh, outputs=[gallery, records], api_visibility="private")
        page.load(lambda: gr.update(choices=available_loras(d.lora_dir)), outputs=lora_pick,
                  api_visibility="private")  # files added to the LoRA folder show at the next page load
        _api(app)
    return page


def _api(app: App) -> None:
    """Named endpoints for gradio_client (see README): generate waits, the others return at once."""

    def generate(image, prompt, model, request, end_image=None, keyframe_images=None, keyframe_times="",
                 extend_video=None, **values) -> dict:
        """Queue a job from an image file and wait for it; returns its final state and video path. Every job
        control can be given by name (see the schema); the rest take the server's defaults. `end_image` and
        `keyframe_images` (with `keyframe_times`, '1.2, 3.6') steer the FramePack model toward those images."""
        label = app.label_of(model) if model else next(iter(app.model_labels))
        try:
            keyframes = keyframes_from(keyframe_times, [_file_path(f) for f in keyframe_images or []])
            job_id = app.submit(_file_path(image), label, {"prompt": prompt, **values}, _owner(app, request),
                                _file_path(end_image), keyframes, _file_path(extend_video))
        except InputError as exc:
            return {"state": "rejected", "error": str(exc)}
        return _snapshot_dict(app.queue.wait(job_id))

    P = inspect.Parameter
    d = app.defaults
    params = [P("image", P.POSITIONAL_OR_KEYWORD, default=None, annotation=FileData | None),
              P("prompt", P.POSITIONAL_OR_KEYWORD, default="", annotation=str),
              P("model", P.POSITIONAL_OR_KEYWORD, default="", annotation=str),
              P("negative_prompt", P.POSITIONAL_OR_KEYWORD, default="", annotation=str)]
    tail = [P("request", P.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request)]  # Gradio fills it in
    params += [P(f.name, P.POSITIONAL_OR_KEYWORD, default=getattr(d, f.name), annotation=python_type(f))
               for f in job_fields()]
    params += [P("end_image", P.POSITIONAL_OR_KEYWORD, default=None, annotation=FileData | None),  # after the fields,
               P("keyframe_images", P.POSITIONAL_OR_KEYWORD, default=None,  # so positional callers keep working
                 annotation=list[FileData] | None),
               P("keyframe_times", P.POSITIONAL_OR_KEYWORD, default="", annotation=str),
               P("extend_video", P.POSITIONAL_OR_KEYWORD, default=None, annotation=FileData | None)]
    generate = with_signature(generate, params + tail)

    def job_status(job_id: str, request: gr.Request) -> dict:
        """State, progress and video of one job."""
        snap = app.queue.get(job_id, app.viewer(request)) if isinstance(job_id, str) else None
        return _snapshot_dict(snap) if snap else {"state": "unknown", "error": f"no job {str(job_id)[:64]!r}"}

    def queue(request: gr.Request) -> list[dict]:
        """Every job of this session you may see, oldest first."""
        return [_snapshot_dict(s) for s in app.queue.jobs(app.viewer(request))]

    gr.api(generate, api_name="generate")
    gr.api(job_status, api_name="job_status")
    gr.api(queue, api_name="queue")


def _owner(app: App, request) -> str | None:
    return getattr(request, "username", None) if app.signed_in else None


def _file_path(value) -> str | None:
    """The path of a file the client uploaded (gradio_client sends FileData, or its dict form). Anything else,
    a plain server path included, is refused: the server never opens a file a client did not upload."""
    if value is None:
        return None
    path = value.get("path") if isinstance(value, dict) else getattr(value, "path", None)
    if not isinstance(path, str) or inside(path, get_upload_folder()) is None:
        raise InputError("the image must be an uploaded file (gradio_client: handle_file(...))")
    return path


def _snapshot_dict(snap: JobSnapshot) -> dict:
    return {"job_id": snap.job_id, "state": snap.state, "model": snap.model, "stage": snap.stage,
            "progress": round(snap.fraction, 4), "video": snap.video, "frames": snap.frames, "error": snap.error,
            "sidecar": snap.sidecar, "elapsed_s": round(snap.elapsed_s, 2), "worker": snap.worker, "gpu": snap.gpu}


def create(argv=None) -> tuple[gr.Blocks, App, Settings]:
    loaded = start(argv)
    s = loaded.settings
    model = model_name(s)
    if model.startswith("tiny"):
        labels = {"Tiny (inverted, offline)": "tiny", "Tiny F1 (offline)": "tiny-f1"}
    else:
        labels = {"FramePack": "framepack", "FramePack-F1": "f1"}
    labels = dict(sorted(labels.items(), key=lambda kv: kv[1] != model))  # the chosen model first
    from diffusers_helper.app.workers import PoolError, job_pool

    try:
        provider = engine_provider(s)  # checks the devices
        pool = job_pool(s)  # None: the in-process worker; a pool's workers each load their own models
        log.info("Loading %s models before the UI starts", model)
        if pool is not None:
            pool.preload(model)
        else:
            provider.get(model)
    except (WeightsMissingError, ValueError, PoolError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    app = App(queue=JobQueue(provider, outputs_dir=s.output_dir, pool=pool), outputs_dir=Path(s.output_dir),
              model_labels=labels, defaults=s, signed_in=bool(s.auth or s.auth_file), admins=frozenset(s.admin_users))
    return build_app(app), app, s


def main(argv=None):
    page, app, s = create(argv)
    logins = credentials(s.auth, s.auth_file)  # checked at start-up already: here only read
    warning = exposure_warning(s.server, s.share, bool(logins))
    if warning:
        log.warning("%s\n%s\n%s", "!" * 100, warning, "!" * 100)
    if logins:
        log.info("Sign-in on for %d user(s); admins: %s", len(logins), ", ".join(sorted(app.admins)) or "none")
    page.queue().launch(server_name=s.server, server_port=s.port or None, share=s.share, inbrowser=s.inbrowser,
                        css=CSS, allowed_paths=[str(app.outputs_dir.resolve())], auth=logins or None,
                        max_file_size=f"{s.max_upload_mb}mb")


if __name__ == "__main__":
    main()
