"""FramePack web app: an image and a prompt in, a video out, section by section.

    python demo_gradio.py            # real models (downloaded once, ~30 GB)
    python demo_gradio.py --tiny     # small random models built locally, works offline

The UI only turns engine events into widget updates; all tensor work happens in diffusers_helper.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field

import gradio as gr

from diffusers_helper.engine import iter_events
from diffusers_helper.events import Cancelled, Failed, Finished, SectionFinished, Stage, StepProgress
from diffusers_helper.loading import WeightsMissingError
from diffusers_helper.request import GenerationRequest, InputError
from diffusers_helper.sampling import CancelToken
from diffusers_helper.service import EngineProvider
from diffusers_helper.settings import Settings
from diffusers_helper.startup import decode_options, device_arg, model_name, placement_override, start

log = logging.getLogger("framepack.app")

QUICK_PROMPTS = [
    "The girl dances gracefully, with clear movements, full of charm.",
    "A character doing some simple body movements.",
    "The camera slowly pushes in while the subject turns their head and smiles.",
]
MAX_SEED = 2**31 - 1


@dataclass
class AppState:
    """One desktop user: the engine provider and the running job's stop token."""

    provider: EngineProvider
    model_labels: dict[str, str]
    defaults: Settings = field(default_factory=Settings)
    cancel: CancelToken | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def progress_html(fraction: float, text: str) -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="fp-progress"><div class="fp-label">{text}</div>'
            f'<div class="fp-track"><div class="fp-bar" style="width:{pct:.1f}%"></div></div></div>')


def _eta(elapsed: float, fraction: float) -> str:
    if fraction <= 0:
        return ""
    remaining = elapsed * (1 - fraction) / fraction
    return f", about {remaining:.0f} s left"


def run_job(state: AppState, image, prompt, negative_prompt, model_label, seed, seconds, window, steps, cfg, gs,
            rs, use_teacache, gpu_memory_preservation, crf, quality_mode=False):
    """Generator bound to Start: yields (video, preview, status, progress, start, stop) updates."""
    idle = (gr.update(interactive=True), gr.update(interactive=False))
    busy = (gr.update(interactive=False), gr.update(interactive=True))
    model = state.model_labels.get(model_label, model_label)
    try:
        request = GenerationRequest(
            prompt=prompt or "", image=image, negative_prompt=negative_prompt or "", seed=int(seed),
            seconds=float(seconds), latent_window_size=int(window), steps=int(steps), cfg=float(cfg),
            gs=float(gs), rs=float(rs), use_teacache=bool(use_teacache),
            gpu_memory_preservation_gb=float(gpu_memory_preservation), mp4_crf=int(crf),
            teacache_threshold=state.defaults.teacache_threshold, quality_mode=bool(quality_mode),
            resolution=state.defaults.resolution or None).validate()
    except InputError as exc:
        gr.Warning(str(exc))
        yield None, None, f"**Cannot start:** {exc}", "", *idle
        return
    if not state.lock.acquire(blocking=False):
        gr.Warning("A job is already running; stop it or wait for it to finish.")
        yield gr.update(), gr.update(), "A job is already running.", gr.update(), *idle
        return
    try:
        yield None, None, f"Loading {model_label}...", progress_html(0, "Loading models"), *busy
        try:
            engine = state.provider.get(model)
        except (WeightsMissingError, ValueError) as exc:
            yield None, None, f"**Cannot load models:** {exc}", "", *idle
            return
        state.cancel = CancelToken()
        video = None
        for event in iter_events(engine, request, state.cancel):
            if isinstance(event, Stage):
                yield gr.update(), gr.update(), event.message, gr.update(), *busy
            elif isinstance(event, StepProgress):
                text = (f"Section {event.section}/{event.sections}, step {event.step}/{event.steps}"
                        f"{_eta(event.elapsed_s, event.fraction)}")
                yield gr.update(), event.preview, text, progress_html(event.fraction, text), *busy
            elif isinstance(event, SectionFinished):
                video = str(event.video_path)
                text = (f"Section {event.section}/{event.sections} done: {event.frames} frames "
                        f"({event.frames / 30:.2f} s of video). {event.cache_note}")
                yield video, gr.update(), text, gr.update(), *busy
            elif isinstance(event, Finished):
                text = f"Finished: {event.frames} frames in {event.elapsed_s:.1f} s. Saved to {event.video_path}"
                yield str(event.video_path), None, text, progress_html(1, "Done"), *idle
            elif isinstance(event, Cancelled):
                kept = f" Kept {event.video_path}." if event.video_path else ""
                yield video, None, f"Stopped.{kept}", "", *idle
            elif isinstance(event, Failed):
                gr.Warning(event.error)
                yield video, None, f"**Failed:** {event.error}", "", *idle
    finally:
        state.cancel = None
        state.lock.release()


def stop_job(state: AppState):
    if state.cancel is not None:
        state.cancel.cancel()
        return "Stopping after the current step..."
    return "Nothing is running."


CSS = """
.fp-progress {margin: 4px 0}
.fp-label {font-size: 0.9em; margin-bottom: 4px}
.fp-track {width: 100%; height: 10px; background: #e5e7eb; border-radius: 5px; overflow: hidden}
.fp-bar {height: 100%; background: #2563eb; transition: width 0.3s}
"""


def build_app(state: AppState) -> gr.Blocks:
    labels = list(state.model_labels)
    d = state.defaults
    with gr.Blocks(title="FramePack") as app:
        gr.Markdown("# FramePack\nTurn an image and a prompt into a video, one section at a time.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(sources=["upload"], type="numpy", label="Image", height=320, elem_id="input-image")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                quick = gr.Dataset(samples=[[p] for p in QUICK_PROMPTS], label="Quick prompts",
                                   components=[prompt])
                quick.click(lambda x: x[0], inputs=[quick], outputs=prompt, show_progress="hidden", queue=False)
                with gr.Row():
                    start = gr.Button("Start Generation", variant="primary", elem_id="start")
                    stop = gr.Button("End Generation", interactive=False, elem_id="stop")
                model = gr.Radio(labels, value=labels[0], label="Model", elem_id="model")
                with gr.Group():
                    use_teacache = gr.Checkbox(label="Use TeaCache", value=d.use_teacache,
                                               info="Faster, but can hurt hands and fingers.")
                    quality = gr.Checkbox(label="Quality Mode", value=d.quality_mode,
                                          info="Decode each section in one pass where memory allows: no tile "
                                               "seams, more VRAM.", elem_id="quality-mode")
                    negative_prompt = gr.Textbox(label="Negative prompt", value="", visible=d.cfg > 1.0)
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=d.seed, precision=0, minimum=0, maximum=MAX_SEED)
                        randomize = gr.Button("Random seed", size="sm")
                    seconds = gr.Slider(label="Total video length (seconds)", minimum=1, maximum=120, value=d.video_length,
                                        step=0.1)
                    window = gr.Slider(label="Latent window size", minimum=1, maximum=33, value=d.latent_window_size, step=1,
                                       visible=False)
                    steps = gr.Slider(label="Steps", minimum=1, maximum=100, value=d.steps, step=1,
                                      info="Changing this is not recommended.")
                    cfg = gr.Slider(label="CFG scale", minimum=1.0, maximum=32.0, value=d.cfg, step=0.01,
                                    info="Real guidance; above 1 uses the negative prompt and is twice as slow.")
                    gs = gr.Slider(label="Distilled CFG scale", minimum=1.0, maximum=32.0, value=d.gs, step=0.01)
                    rs = gr.Slider(label="CFG rescale", minimum=0.0, maximum=1.0, value=d.rs, step=0.01)
                    gpu_mem = gr.Slider(label="GPU memory preservation (GB)", minimum=6, maximum=128,
                                        value=max(6.0, d.gpu_memory_preservation),
                                        step=0.1, info="Larger keeps more VRAM free, at some speed.")
                    crf = gr.Slider(label="MP4 compression (CRF)", minimum=0, maximum=51, value=d.mp4_crf, step=1,
                                    info="Lower is better; 0 is lossless and can show black in some players.")
            with gr.Column():
                preview = gr.Image(label="Next latents", height=200, visible=True, interactive=False,
                                   elem_id="preview")
                result = gr.Video(label="Finished frames", autoplay=True, loop=True, height=512,
                                  interactive=False, elem_id="result")
                status = gr.Markdown("", elem_id="status")
                bar = gr.HTML("", elem_id="progress")

        cfg.change(lambda v: gr.update(visible=v > 1.0), inputs=cfg, outputs=negative_prompt, queue=False)
        randomize.click(lambda: random.randint(0, MAX_SEED), outputs=seed, queue=False)
        inputs = [image, prompt, negative_prompt, model, seed, seconds, window, steps, cfg, gs, rs, use_teacache,
                  gpu_mem, crf, quality]
        start.click(lambda *a: (yield from run_job(state, *a)), inputs=inputs,
                    outputs=[result, preview, status, bar, start, stop], api_name="generate")
        stop.click(lambda: stop_job(state), outputs=status, api_name="stop", queue=False)
    return app


def main(argv=None):
    loaded = start(argv)
    s = loaded.settings
    model = model_name(s)
    if model.startswith("tiny"):
        labels = {"Tiny (inverted, offline)": "tiny", "Tiny F1 (offline)": "tiny-f1"}
    else:
        labels = {"FramePack": "framepack", "FramePack-F1": "f1"}
    labels = dict(sorted(labels.items(), key=lambda kv: kv[1] != model))  # the chosen model first
    provider = EngineProvider(models_dir=s.models_dir or None, offline=True if (s.offline or s.tiny) else None,
                              device=device_arg(s), outputs_dir=s.output_dir, placement=placement_override(s),
                              decode_options=decode_options(s), async_decode=s.async_decode)
    state = AppState(provider=provider, model_labels=labels, defaults=s)
    log.info("Loading %s models before the UI starts", model)
    try:
        provider.get(model)
    except WeightsMissingError as exc:
        log.error("%s", exc)
        raise SystemExit(2)
    app = build_app(state)
    app.queue().launch(server_name=s.server, server_port=s.port or None, share=s.share, inbrowser=s.inbrowser,
                       css=CSS, allowed_paths=[str(provider.outputs_dir.resolve())])


if __name__ == "__main__":
    main()
