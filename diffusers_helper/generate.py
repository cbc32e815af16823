"""Headless generation: one image and prompt in, one MP4 out.

    python -m diffusers_helper.generate --image IMG --prompt TEXT --model tiny --seconds 2 --output outputs

Prints the final MP4 path on stdout; progress and logs go to stderr. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import fields

from .pipeline.request import GenerationRequest, InputError, load_image

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_CANCELLED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser(defaults=None) -> argparse.ArgumentParser:
    """Flags default to the FRAMEPACK_* settings (config file and environment), then the schema's defaults.
    Every per-job control has its flags from `config.job`; the rest are about this run."""
    from .config import Settings, job_fields
    from .config.job import number, python_type

    s = defaults or Settings()
    models = next(f.metadata["choices"] for f in fields(Settings) if f.name == "model")  # no torch for --help
    p = _Parser(prog="python -m diffusers_helper.generate", description="FramePack image-to-video, headless.")
    p.add_argument("--image", default=None, help="input image file")
    p.add_argument("--extend", default=None, metavar="VIDEO", help="a video to continue instead of an image (F1 "
                   "model); the output holds the video and the new frames")
    p.add_argument("--prompt", required=True, help="what should happen in the video")
    p.add_argument("--negative-prompt", default="", help="used only when --cfg > 1")
    p.add_argument("--end-image", default=None, metavar="PATH", help="the last frame to steer toward (FramePack "
                   "model; strength: --end-strength)")
    p.add_argument("--keyframe", action="append", default=[], metavar="SECONDS:PATH",
                   help="an image the video reaches at that time (FramePack model); repeat for several")
    p.add_argument("--model", default=s.model, help=f"one of {', '.join(models)}")
    jobs = p.add_argument_group("job controls")
    for f in job_fields():
        m, default = f.metadata, getattr(s, f.name)
        limits = f" ({number(m['min'])} to {number(m['max'])})" if m["min"] is not None else ""
        if f.type == "bool":
            if m["flags"]:
                jobs.add_argument(*m["flags"], dest=f.name, action="store_true", default=default,
                                  help=f"{m['help']} (default: {'on' if default else 'off'})")
            if m["negative_flags"]:
                jobs.add_argument(*m["negative_flags"], dest=f.name, action="store_false",
                                  help=f"turn off: {m['label']}")
        else:
            choices = f" (one of {', '.join(m['choices'])})" if m["choices"] else ""
            jobs.add_argument(*m["flags"], dest=f.name, type=python_type(f), default=default,
                              metavar=f.name.upper(), help=f"{m['help']}{limits}{choices}; default {default}")
        for flag, value in m["const_flags"].items():
            jobs.add_argument(flag, dest=f.name, action="store_const", const=value, help=f"same as {m['flags'][0]} "
                              f"{value}")
    jobs.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                      help="a LoRA file and its weight (1 when left out); repeat for several. --loras takes names "
                           "in the LoRA folder instead")
    jobs.add_argument("--cache-threshold", type=float, default=None, metavar="X",
                      help="the chosen step cache's threshold (TaylorSeer: its interval)")
    p.add_argument("--output", default=s.output_dir, help="output folder")
    p.add_argument("--models-dir", default=s.models_dir or None, help="local folder laid out like the HF repos")
    p.add_argument("--offline", action="store_true", default=s.offline, help="never download (HF_HUB_OFFLINE=1)")
    p.add_argument("--device", default=None if s.device == "auto" else s.device,
                   help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def request_from_args(args) -> GenerationRequest:
    from .config import job_fields
    from .models.specs import MODEL_NAMES

    if args.model not in MODEL_NAMES:
        raise InputError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    from pathlib import Path

    from .config.loras import LoraError, parse_lora_list
    from .config.job import cache_threshold_field

    values = {f.name: getattr(args, f.name) for f in job_fields()}
    target = cache_threshold_field(str(values["cache"]).lower())
    if args.cache_threshold is not None and target is not None:
        values[target] = args.cache_threshold
    try:
        for path, weight in parse_lora_list(",".join(args.lora)):
            if not Path(path).is_file():
                raise InputError(f"LoRA file not found: {Path(path).name}")
            values["loras"] = ", ".join(filter(None, [values["loras"], f"{Path(path).resolve()}:{weight:g}"]))
    except LoraError as exc:
        raise InputError(str(exc)) from None
    keyframes = []
    for item in args.keyframe:
        seconds, sep, path = item.partition(":")
        try:
            seconds = float(seconds)
        except ValueError:
            raise InputError(f"--keyframe takes SECONDS:PATH, got {item!r}") from None
        keyframes.append((seconds, load_image(path)))
    end = load_image(args.end_image) if args.end_image else None
    if (args.image is None) == (args.extend is None):
        raise InputError("give either --image or --extend VIDEO")
    image = load_image(args.image) if args.image else None
    return GenerationRequest(prompt=args.prompt, image=image, negative_prompt=args.negative_prompt,
                             end_image=end, keyframes=keyframes, extend_video=args.extend,
                             **values).validate()


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
        request = request_from_args(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from .app.startup import output_dir_problem

    problem = output_dir_problem(args.output)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
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
    settings, rank = _context_parallel(loaded.settings, args)
    try:
        provider = engine_provider(settings, models_dir=args.models_dir, offline=True if args.offline else None,
                                   device=args.device, outputs_dir=args.output)
        engine = provider.get(args.model)
    except (WeightsMissingError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if rank is not None:
        from .parallel.ranks import RankEngine, follower_engine, run_job

        if rank > 0:  # computes its share of each forward; rank 0 reports and writes the video
            import tempfile

            with tempfile.TemporaryDirectory(prefix=f"framepack-rank{rank}-") as scratch:
                run_job(follower_engine(engine, scratch), request, lambda event: None, None, None)
            return 0
        engine = RankEngine(engine)
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


def _context_parallel(settings, args):
    """Under `torchrun --nproc-per-node N`: join the N ranks, each on its own GPU, and share every forward."""
    from dataclasses import replace

    from .parallel.ranks import init_ranks, torchrun_rank

    ranks = torchrun_rank()
    if ranks is None:
        if settings.cp_gpus > 1:
            logging.getLogger("framepack").warning(
                "FRAMEPACK_CP_GPUS=%d: the command line shares a video across GPUs when started with torchrun "
                "--nproc-per-node %d; running on one device", settings.cp_gpus, settings.cp_gpus)
        return replace(settings, cp_gpus=1), None
    rank, world = ranks
    device = init_ranks(rank, world)
    args.device = str(device)
    if rank > 0:
        logging.getLogger().setLevel(logging.WARNING)
    return replace(settings, cp_gpus=world), rank


if __name__ == "__main__":
    sys.exit(main())
