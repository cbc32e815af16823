"""Runs one generation job: conditioning -> section loop -> decode -> MP4, reporting typed events.

The engine owns loaded models and a placement policy; `generate` is callback-based so it can run on
a worker thread, and `iter_events` turns it into an iterator for the CLI and the UI.
"""

from __future__ import annotations

import gc
import logging
import platform
import queue
import secrets
import threading
import time
import traceback
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import torch

from .. import __version__
from .conditioning import JobImages, encode_job_images, encode_prompt
from ..vae.decode import SectionDecoder, VideoAccumulator
from .finisher import JobFiles, SectionFinisher
from .events import TERMINAL, Cancelled, Event, Failed, Finished, Stage, StepProgress, one_line
from ..memory.placement import MemoryPolicy, Placement
from ..media.preview import latent_preview
from .request import GenerationRequest, InputError
from .sampling import CancelToken, Guidance, JobCancelled, StepInfo, draw_noise, sample_section
from .sections import SectionSchedule, frame_count, section_count
from .prepare import TransformerPlan, prepare_transformer
from .prompts import JobPrompts, encode_job_prompts
from ..caches.base import CacheContext, CacheSettings
from ..accel.lora import LoraManager
from ..config.loras import LoraError, resolve_loras
from ..vae.plan import DecodeOptions
from ..media.video import FPS, describe_write_error, write_json, write_png

log = logging.getLogger("framepack.engine")

Emit = Callable[[Event], None]


def new_job_id() -> str:
    """Sortable by time; 64 random bits, so one user cannot guess another's file names on a shared server."""
    return datetime.now().strftime("%Y%m%d_%H%M%S_") + secrets.token_hex(8)


def versions() -> dict:
    import diffusers
    import transformers

    return {"framepack_app": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


class Engine:
    computes_only = False  # a context-parallel rank but the first: no decode, no video

    def __init__(self, bundle, placement: Placement | None = None, outputs_dir: str | Path = "outputs",
                 decode_options: DecodeOptions | None = None, async_decode: str = "auto",
                 plan: TransformerPlan | None = None, lora_dir: str | Path = "loras"):
        self.bundle = bundle
        self.spec = bundle.spec
        self.placement = placement or Placement.choose(torch.device("cpu"))
        self.plan = plan or TransformerPlan()
        self.report = prepare_transformer(bundle, self.plan, self.placement)
        self.step_caches = self.report.step_caches
        self.loras = LoraManager(bundle.transformer, self.placement.compute_device())
        self.lora_dir = Path(lora_dir)
        self.decoder = SectionDecoder(bundle.vae, decode_options)
        self.base_decode_options = self.decoder.options
        self.model_dtype = self.dtype = bundle.transformer.dtype
        self.background_decode = self._choose_background_decode(async_decode)
        self.outputs_dir = Path(outputs_dir)
        self._lock = threading.Lock()  # one job at a time per set of models

    def _cache_context(self, request) -> CacheContext:
        """What MagCache needs to pick its ratios: the model family, the bucket and where calibrations live."""
        store = self.plan.cache_store
        return CacheContext(family="F1" if self.spec.mode == "f1" else "Original",
                            resolution=request.resolution or self.spec.default_resolution, model=self.spec.name,
                            store=Path(store) if store else None, steps=request.steps)

    def _choose_background_decode(self, mode: str) -> bool:
        """Decode section k while k+1 samples: on the VAE's own device when it has one (a second GPU), else on
        a side stream of the compute GPU when every model stays resident."""
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"async decode must be auto, on or off, got {mode!r}")
        device = self.placement.compute_device()
        own = self.placement.own_device("vae")
        full = self.placement.policy == "full"
        if mode == "off" or (mode == "auto" and not (own or (device.type == "cuda" and full))):
            log.info("Decoding each section before sampling the next (async decode %s)", mode)
            return False
        if own:
            log.info("Decoding on %s while %s samples the next section", self.placement.device_of("vae"), device)
        else:
            log.info("Decoding each section on a worker thread while the next one samples (%s)",
                     "side CUDA stream" if device.type == "cuda" else "CPU")
        return True

    def _apply_job_options(self, request: GenerationRequest) -> None:
        """The UI's memory and performance controls, for this job."""
        aggressive = request.aggressive_gpu
        preserve = request.gpu_memory_preservation_gb / 2 if aggressive else request.gpu_memory_preservation_gb
        self.placement.memory = MemoryPolicy(keep_loaded=request.keep_models_in_gpu,
                                             offload_threshold_gb=request.cpu_offload_threshold_gb,
                                             preserve_gb=preserve)
        base = self.base_decode_options
        self.decoder.options = replace(
            base, chunk_multiplier=request.chunk_size_multiplier * (2.0 if aggressive else 1.0),
            max_attention_tokens=request.vae_attention_tokens, reserve_gb=min(base.reserve_gb, 0.5) if aggressive
            else base.reserve_gb)
        if aggressive:
            log.info("Aggressive mode: Larger chunks and higher memory utilization enabled")
        self._set_precision(request.mixed_precision)

    def _recover_from_oom(self, finisher: SectionFinisher | None = None) -> str | None:
        """Free what can be freed and move to a more frugal placement; None when there is none left.

        The decode thread finishes first, since the step-down moves models; once the VAE has to share the
        compute GPU with a streamed transformer, sections are decoded in turn instead of in the background."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.dtype != self.model_dtype:
            return None  # float32 needs the transformer resident; a smaller policy cannot help
        if finisher is not None:
            finisher.wait()
        change = self.placement.degrade(self.bundle)
        if change is not None and self.background_decode and not self.placement.own_device("vae"):
            if finisher is not None:
                finisher.stop_background()
            self.background_decode = False
            change += "; decoding each section before sampling the next"
        return change

    def _stepping_down(self, where: str, run, record: dict, emit: Emit, finisher: SectionFinisher | None = None,
                       retrying: str = "retrying", before_retry=None):
        """`run()`, retried after each out-of-memory step-down until it fits or nothing is left to give up; each
        step-down is logged, shown and kept in the sidecar."""
        while True:
            try:
                return run()
            except torch.cuda.OutOfMemoryError:
                change = self._recover_from_oom(finisher)
                if change is None:
                    raise
                msg = f"Out of GPU memory {where}: {change}, {retrying}"
                log.warning(msg)
                record.setdefault("oom_recoveries", []).append(msg)
                emit(Stage(msg))
                if before_retry is not None:
                    before_retry()

    def _set_precision(self, mixed: bool) -> None:
        """Mixed precision off computes the transformer in float32 (twice the memory, no rounding)."""
        target = self.model_dtype if mixed else torch.float32
        if self.dtype == target:
            return
        if self.placement.policy != "full":
            raise InputError("turning mixed precision off needs every model on the GPU: enable 'Keep models "
                             "in GPU' at start-up (FRAMEPACK_KEEP_MODELS_IN_GPU=1) or use a larger GPU")
        self.bundle.transformer.to(target)
        self.dtype = target
        log.info("Transformer now computes in %s", str(target).removeprefix("torch."))

    def warm_up(self, size: int = 640, window: int = 9) -> float | None:
        """Compile the transformer's kernels now, at this bucket, instead of in the first job; None when
        there is nothing to compile."""
        if not self.report["compile"].details.get("compiled_blocks"):
            return None
        from .warmup import warm_up

        with self._lock:
            self.placement.use(self.bundle, "transformer")
            return warm_up(self.bundle.transformer, size, window, self.dtype, self.device)

    @property
    def device(self) -> torch.device:
        return self.placement.compute_device()

    # -- stages ---------------------------------------------------------------------------------------

    def _encode_prompts(self, request: GenerationRequest, sections: int) -> JobPrompts:
        b = self.bundle
        self.placement.use(b, "text_encoder", "text_encoder_2")
        crop = self.spec.prompt_crop_start

        def encode(text: str):
            return encode_prompt(text, b.text_encoder, b.text_encoder_2, b.tokenizer, b.tokenizer_2, crop)

        return encode_job_prompts(request.prompt, request.negative_prompt, request.cfg, sections,
                                  request.latent_window_size * 4 / FPS, request.prompt_blend_sections, encode)

    def _encode_image(self, request: GenerationRequest, files: JobFiles) -> JobImages:
        images = encode_job_images(self.bundle, lambda *names: self.placement.use(self.bundle, *names), request,
                                   request.resolution or self.spec.default_resolution)
        write_png(images.image, files.image)
        if images.end_image is not None:
            write_png(images.end_image, files.image.with_name(f"{files.job_id}_end.png"))
        for n, (_, _, fitted) in enumerate(images.keyframes, 1):
            write_png(fitted, files.image.with_name(f"{files.job_id}_keyframe{n}.png"))
        return images

    # -- the job --------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, emit: Emit, cancel: CancelToken | None = None,
                 job_id: str | None = None, owner: str | None = None) -> Event:
        """Run a job to the end, emitting events; returns the terminal event (also emitted)."""
        cancel = cancel or CancelToken()
        t0 = time.perf_counter()
        files: JobFiles | None = None
        record: dict = {}

        def kept() -> tuple[Path | None, Path | None]:
            """The last complete video and the sidecar, for the terminal event."""
            return (files.video, files.sidecar) if files is not None else (None, None)

        def finish(event: Event, status: str, error: str | None = None) -> Event:
            """Record the outcome in the sidecar, then emit it; a sidecar that cannot be written fails a job that
            would have finished, but never stops the terminal event from reaching the caller."""
            if files is not None:
                record.update(status=status, error=error, video=str(files.video) if files.video else None,
                              elapsed_s=round(time.perf_counter() - t0, 3))
                try:
                    write_json(record, files.sidecar)
                except OSError as exc:
                    log.error("Writing the sidecar failed: %s", exc)
                    if isinstance(event, Finished):
                        event = Failed(f"{describe_write_error(exc)}; the video was kept", files.video, None)
            emit(event)
            return event

        with self._lock:
            try:
                request.validate()
                self._apply_job_options(request)
                files = JobFiles(self.outputs_dir, job_id or new_job_id())
                sections = section_count(request.seconds, request.latent_window_size)
                record = {"job_id": files.job_id, "model": self.spec.name, "mode": self.spec.mode,
                          "settings": request.to_record(), **request.targets_record(), "sections": sections,
                          "expected_frames": frame_count(sections, request.latent_window_size), "fps": 30,
                          "input_image": str(files.image), "versions": versions(), "status": "running",
                          "transformer": self.report.to_record(), "owner": owner,
                          "started": datetime.now().isoformat(timespec="seconds")}
                write_json(record, files.sidecar)
                with torch.inference_mode():
                    video = self._run(request, files, sections, emit, cancel, t0, record)
                return finish(Finished(video, files.sidecar, record.get("frames", 0), time.perf_counter() - t0),
                              "finished")
            except JobCancelled:
                log.info("Job cancelled; kept %s", kept()[0])
                return finish(Cancelled(*kept()), "cancelled")
            except InputError as exc:
                return finish(Failed(str(exc), None, kept()[1]), "failed", str(exc))
            except torch.cuda.OutOfMemoryError:
                log.error("CUDA out of memory:\n%s", traceback.format_exc())
                msg = ("Out of GPU memory. Increase 'GPU memory preservation', shorten the video or close other "
                       "GPU programs; the sections finished so far were kept.")
                return finish(Failed(msg, *kept()), "failed", msg)
            except OSError as exc:  # a full disk, a read-only or forbidden output folder
                log.error("Job failed:\n%s", traceback.format_exc())
                msg = describe_write_error(exc) + ("; the sections finished so far were kept" if kept()[0] else "")
                return finish(Failed(msg, *kept()), "failed", msg)
            except Exception as exc:  # noqa: BLE001 - the user gets one line, the log gets the trace
                log.error("Job failed:\n%s", traceback.format_exc())
                msg = one_line(exc)
                return finish(Failed(msg, *kept()), "failed", msg)
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                    log.info("GPU Memory after generation: %.2f GB (peak %.2f GB)",
                             torch.cuda.memory_allocated(self.device) / 1024**3,
                             torch.cuda.max_memory_allocated(self.device) / 1024**3)

    def _run(self, request, files, sections, emit, cancel, t0, record) -> Path:
        b = self.bundle
        try:  # before any model work: a LoRA that does not fit fails the job in one line
            log.info("%s", self.loras.apply(resolve_loras(request.loras, self.lora_dir)))
        except LoraError as exc:
            raise InputError(str(exc)) from None
        record["loras"] = [{"file": Path(p).name, "weight": w} for p, w in self.loras.active]
        emit(Stage("Encoding prompt"))
        prompts = self._stepping_down("while encoding the prompt", lambda: self._encode_prompts(request, sections),
                                      record, emit)
        if prompts.schedule:
            record["prompt_schedule"] = prompts.schedule
        cancel.raise_if_cancelled()
        emit(Stage("Encoding image"))
        images = self._stepping_down("while encoding the image", lambda: self._encode_image(request, files), record,
                                     emit)
        cancel.raise_if_cancelled()
        start_latent, image_embeds, (height, width) = images.start_latent, images.embeds, images.image.shape[:2]
        record["bucket"] = [height, width]

        device, dtype = self.device, self.dtype
        shared = {"image_embeds": image_embeds.to(device=device, dtype=dtype)}

        def text(e) -> dict:
            return {"encoder_hidden_states": e.llama.to(device, dtype), "encoder_attention_mask":
                    e.llama_mask.to(device), "pooled_projections": e.pooled.to(device, dtype), **shared}

        positives = [text(e) for e in prompts.sections]
        negative = text(prompts.negative)
        guidance = Guidance(cfg=request.cfg, gs=request.gs, rs=request.rs, batch=request.batch_processing)

        window = request.latent_window_size
        schedule = SectionSchedule(self.spec.mode, start_latent, sections, window)
        try:
            ends = schedule.set_targets(images.end_latent, [(t, z) for t, z, _ in images.keyframes], window * 4 / FPS,
                                        request.end_strength)
            schedule.continue_from(images.source_latents)  # a video to extend: its last frames are the history
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if ends:
            record["section_targets"] = ends
            log.info("Aiming sections at images: %s", "; ".join(f"section {k}: {v}" for k, v in ends.items()))
        video = VideoAccumulator(self.spec.mode, schedule.overlap_frames, images.source_frames)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        cache = self.step_caches
        log.info("%s", cache.select(CacheSettings.of(request), self._cache_context(request)))
        record["step_cache"] = cache.record()
        finisher = SectionFinisher(
            decode=lambda latents: self.decoder.decode(latents, quality=request.quality_mode), video=video,
            write=lambda frames: files.write_video(frames, request.mp4_crf), emit=emit,
            on_frames=lambda n: record.__setitem__("frames", n), t0=t0, background=self.background_decode,
            device=b.vae.device)
        try:
            for k in range(sections):
                emit(Stage(f"Sampling section {k + 1}/{sections}"))
                self.placement.use(b, "transformer")
                cache.reset(request.steps)
                noise = draw_noise(generator, 1, window, height // 8, width // 8)
                section_kwargs = schedule.inputs(k).to_kwargs(device, dtype)

                def on_step(info: StepInfo, k=k) -> None:
                    emit(StepProgress(section=k + 1, sections=sections, step=info.step + 1, steps=info.steps,
                                      preview=latent_preview(info.denoised), elapsed_s=time.perf_counter() - t0))

                def sample(on_step=on_step):
                    return sample_section(b.transformer, noise=noise, steps=request.steps,
                                          positive={**positives[schedule.time_index(k) % len(positives)],
                                                    **section_kwargs},
                                          negative={**negative, **section_kwargs}, guidance=guidance, dtype=dtype,
                                          device=device, on_step=on_step, cancel=cancel)

                # the same noise: the retry gives the same section
                latents = self._stepping_down(f"in section {k + 1}/{sections}", sample, record, emit, finisher,
                                              "retrying the section", lambda: cache.reset(request.steps))
                schedule.add(k, latents)
                note = cache.note()
                record["step_cache"] = cache.record()
                if note:
                    log.info("Section %d/%d: %s", k + 1, sections, note)
                if not self.background_decode:
                    emit(Stage(f"Decoding section {k + 1}/{sections}"))
                    self.placement.use(b, "vae")
                if not self.computes_only:
                    finisher.submit(k, sections, schedule.newest_latents(k), note)
                cancel.raise_if_cancelled()
            finisher.drain()
        except BaseException:
            try:
                finisher.drain()  # sections that finished sampling are still decoded and kept
            except Exception:  # noqa: BLE001 - the first error is the one to report
                log.exception("Finishing the sampled sections failed")
            raise
        finally:
            cache.off()
        if self.decoder.last_plan is not None:
            record["decode"] = self.decoder.last_plan.reason
        record["decode_busy_s"] = round(finisher.busy_s, 3)
        return files.video


def iter_events(engine: Engine, request: GenerationRequest, cancel: CancelToken | None = None,
                job_id: str | None = None) -> Iterator[Event]:
    """Run `engine.generate` on a worker thread and yield its events until the terminal one."""
    events: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            engine.generate(request, events.put, cancel, job_id)
        except BaseException as exc:  # noqa: BLE001 - the consumer must get a terminal event, never wait forever
            log.exception("The job's thread failed")
            events.put(Failed(one_line(exc), None, None))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while True:
        event = events.get()
        yield event
        if isinstance(event, TERMINAL):
            break
    worker.join()
