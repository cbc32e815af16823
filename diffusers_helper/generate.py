"""Headless generation: one image and prompt in, one MP4 out.

    python -m diffusers_helper.generate --image IMG --prompt TEXT --model tiny --seconds 2 --output outputs

Prints the final MP4 path on stdout; progress and logs go to stderr. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .models.specs import MODEL_NAMES
from .pipeline.request import GenerationRequest, InputError, load_image

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_CANCELLED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser(defaults=None) -> argparse.ArgumentParser:
    """Flags default to the FRAMEPACK_* settings (config file and environment), then the original's values."""
    from .config import Settings, job_defaults

    s = defaults or Settings()
    d = GenerationRequest(prompt="", **job_defaults(s))
    p = _Parser(prog="python -m diffusers_helper.generate", description="FramePack image-to-video, headless.")
    p.add_argument("--image", required=True, help="input image file")
    p.add_argument("--prompt", required=True, help="what should happen in the video")
    p.add_argument("--negative-prompt", default=d.negative_prompt, help="used only when --cfg > 1")
    p.add_argument("--model", default=s.model, help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--seconds", type=float, default=d.seconds, help="video length in seconds")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--window", type=int, default=d.latent_window_size, help="latent window size")
    p.add_argument("--cfg", type=float, default=d.cfg, help="real CFG scale (1 = off, twice as fast)")
    p.add_argument("--gs", type=float, default=d.gs, help="distilled CFG scale")
    p.add_argument("--rs", type=float, default=d.rs, help="CFG rescale")
    p.add_argument("--no-teacache", dest="teacache", action="store_false", default=d.use_teacache,
                   help="compute every step (best quality)")
    p.add_argument("--teacache-threshold", type=float, default=d.teacache_threshold)
    p.add_argument("--quality-mode", action="store_true", default=s.quality_mode,
                   help="decode each section in as few temporal tiles as memory allows (fewer seams)")
    p.add_argument("--crf", type=int, default=d.mp4_crf, help="MP4 quality, 0-51, lower is better")
    p.add_argument("--resolution", type=int, default=d.resolution, help="bucket resolution (default: the model's)")
    p.add_argument("--output", default=s.output_dir, help="output folder")
    p.add_argument("--models-dir", default=s.models_dir or None, help="local folder laid out like the HF repos")
    p.add_argument("--offline", action="store_true", default=s.offline, help="never download (HF_HUB_OFFLINE=1)")
    p.add_argument("--device", default=None if s.device == "auto" else s.device,
                   help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def request_from_args(args, settings=None) -> GenerationRequest:
    if args.model not in MODEL_NAMES:
        raise InputError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    return GenerationRequest(
        prompt=args.prompt, image=load_image(args.image), negative_prompt=args.negative_prompt, seed=args.seed,
        seconds=args.seconds, latent_window_size=args.window, steps=args.steps, cfg=args.cfg, gs=args.gs,
        rs=args.rs, use_teacache=args.teacache, teacache_threshold=args.teacache_threshold,
        mp4_crf=args.crf, resolution=args.resolution, quality_mode=args.quality_mode,
        **performance_fields(settings),
    ).validate()


def performance_fields(settings) -> dict:
    """The controls the CLI has no flag for, from the settings (the UI lets users change them)."""
    from .config import Settings, job_defaults

    defaults = job_defaults(settings or Settings())
    return {k: defaults[k] for k in ("aggressive_gpu", "keep_models_in_gpu", "chunk_size_multiplier",
                                     "max_chunk_size", "cpu_offload_threshold_gb", "mixed_precision",
                                     "batch_processing", "gpu_memory_preservation_gb")}


def main(argv: list[str] | None = None) -> int:
    from .config import SettingsError, load_settings

    try:
        loaded = load_settings([])  # config file + FRAMEPACK_* environment
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    args = build_parser(loaded.settings).parse_args(argv)
    from .app.logs import configure_logging, enabled_libraries
    from .config import weight_format

    configure_logging("WARNING" if args.quiet else "INFO", enabled_libraries(weight_format(loaded.settings)),
                      fmt="%(message)s")
    try:
        request = request_from_args(args, loaded.settings)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    # Heavy imports only after the input is known to be good.
    from tqdm import tqdm

    from .pipeline.engine import iter_events
    from .pipeline.events import Cancelled, Failed, Finished, SectionFinished, Stage, StepProgress
    from .models.loading import WeightsMissingError
    from .pipeline.sampling import CancelToken
    from .app.startup import apply_runtime_flags, engine_provider

    for line in apply_runtime_flags(loaded.settings):
        logging.getLogger("framepack.startup").info(line)
    provider = engine_provider(loaded.settings, models_dir=args.models_dir, offline=True if args.offline else None,
                               device=args.device, outputs_dir=args.output)
    try:
        engine = provider.get(args.model)
    except (WeightsMissingError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    cancel = CancelToken()
    signal.signal(signal.SIGINT, lambda *_: cancel.cancel())
    bar = None
    code = EXIT_FAILED
    for event in iter_events(engine, request, cancel):
        if isinstance(event, StepProgress):
            if bar is None and not args.quiet:
                bar = tqdm(total=event.sections * event.steps, unit="step", file=sys.stderr)
            if bar is not None:
                bar.n = (event.section - 1) * event.steps + event.step
                bar.set_description(f"section {event.section}/{event.sections}")
                bar.refresh()
        elif isinstance(event, Stage):
            logging.getLogger("framepack").info(event.message)
        elif isinstance(event, SectionFinished):
            logging.getLogger("framepack").info("Section %d/%d done: %d frames -> %s %s", event.section,
                                                event.sections, event.frames, event.video_path, event.cache_note)
        elif isinstance(event, Finished):
            code = 0
            if bar is not None:
                bar.close()
            print(event.video_path)
        elif isinstance(event, Cancelled):
            code = EXIT_CANCELLED
            print(f"cancelled; video so far: {event.video_path}", file=sys.stderr)
        elif isinstance(event, Failed):
            code = EXIT_FAILED
            print(f"error: {event.error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
