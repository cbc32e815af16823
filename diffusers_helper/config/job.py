"""The per-job controls, declared once.

Each field carries its type, default, limits, label, help text, CLI flags and environment variable. From this
one declaration come: the `FRAMEPACK_*` / config.yaml / flag defaults (`Settings` inherits these fields), the
web app's widgets and the names of the API's parameters, the flags of `python -m diffusers_helper.generate`,
the validation of every job (`coerce` / `check`) and the job's settings in its JSON sidecar. Adding a control
is adding one field here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

ACTIVE = "active"
# the step caches a job can choose, and how the UI and the log name them; caches.base registers each one's
# implementation under its name
CACHE_LABELS = {"none": "None", "teacache": "TeaCache", "magcache": "MagCache", "fbcache": "First-block cache",
                "taylorseer": "TaylorSeer"}
CACHE_NAMES = list(CACHE_LABELS)
# `--cache-threshold X` / FRAMEPACK_CACHE_THRESHOLD set the chosen cache's own knob
CACHE_THRESHOLD_FIELDS = {"teacache": "teacache_threshold", "magcache": "magcache_threshold",
                          "fbcache": "fbcache_threshold", "taylorseer": "taylorseer_interval"}


def _j(default, label: str, help: str = "", *, env: str | None = None, flags=(), negative_flags=(), min=None,
       max=None, step=None, choices=None, section: str = "main", what: str | None = None, elem_id: str | None = None,
       widget: str | None = None, shown_with: str | None = None, const_flags: dict | None = None):
    """A job field. `section`: where the web app shows it ("main", "performance", or "hidden": API and CLI only);
    `what`: how error messages name it (default: the label in lower case); `widget`: "number" for a number box
    instead of a slider; `shown_with`: the step cache whose knob it is (the web app shows it only with that
    cache); `const_flags`: flags that set a fixed value (older spellings such as --teacache)."""
    meta = dict(env=env, flags=tuple(flags), help=help, choices=choices, min=min, max=max, status=ACTIVE, note="",
                group="job", aliases=(), negative_flags=tuple(negative_flags), kind=None, label=label, step=step,
                section=section, what=what or label.lower(), elem_id=elem_id, widget=widget, job=True,
                shown_with=shown_with, const_flags=dict(const_flags or {}))
    return field(default=default, metadata=meta)


@dataclass
class JobSettings:
    """The per-job controls, in the order the web app shows them; `Settings` and `GenerationRequest` inherit them."""

    cache: str = _j("teacache", "Step cache", "Reuses the transformer's work on steps that change little: faster, "
                    "can soften fine detail (hands, fingers). MagCache follows FramePack's published ratios.",
                    env="FRAMEPACK_CACHE", flags=["--cache"], choices=CACHE_NAMES, elem_id="cache",
                    const_flags={"--teacache": "teacache", "--no-teacache": "none", "--enable-fbcache": "fbcache"})
    teacache_threshold: float = _j(0.15, "TeaCache threshold", "Accumulated change below which a step is skipped "
                                   "(0: never skip).", env="FRAMEPACK_TEACACHE_THRESHOLD",
                                   flags=["--teacache-threshold"], min=0.0, max=1.0, step=0.01, shown_with="teacache")
    magcache_threshold: float = _j(0.1, "MagCache threshold", "Accumulated magnitude error below which a step is "
                                   "skipped (0: never skip).", env="FRAMEPACK_MAGCACHE_THRESHOLD",
                                   flags=["--magcache-threshold"], min=0.0, max=1.0, step=0.01, shown_with="magcache")
    magcache_max_skips: int = _j(2, "MagCache max consecutive skips", "K: at most this many skipped steps in a row.",
                                 env="FRAMEPACK_MAGCACHE_MAX_SKIPS", flags=["--magcache-max-skips"], min=0, max=10,
                                 step=1, shown_with="magcache")
    magcache_retention: float = _j(0.25, "MagCache retention", "Share of the first steps that always compute.",
                                   env="FRAMEPACK_MAGCACHE_RETENTION", flags=["--magcache-retention"], min=0.0,
                                   max=1.0, step=0.05, shown_with="magcache")
    magcache_calibrate: bool = _j(False, "Calibrate MagCache", "Skip nothing; record this model's magnitude ratios "
                                  "and use them from the next job on.", env="FRAMEPACK_MAGCACHE_CALIBRATE",
                                  flags=["--magcache-calibrate"], shown_with="magcache")
    fbcache_threshold: float = _j(0.05, "First-block cache threshold", "Relative change of the first block's "
                                  "residual below which the other blocks are skipped (0: never skip).",
                                  env="FRAMEPACK_FBCACHE_THRESHOLD", flags=["--fbcache-threshold"], min=0.0, max=1.0,
                                  step=0.005, shown_with="fbcache")
    taylorseer_interval: int = _j(4, "TaylorSeer interval", "After 3 warm-up steps, compute one step in this many "
                                  "and predict the others (1: compute every step).",
                                  env="FRAMEPACK_TAYLORSEER_INTERVAL", flags=["--taylorseer-interval"], min=1, max=10,
                                  step=1, shown_with="taylorseer")
    loras: str = _j("", "LoRAs", "Files in the LoRA folder with their weights, e.g. style.safetensors:0.8, "
                    "detail:0.5 (weight 1 when left out).", env="FRAMEPACK_LORAS", flags=["--loras"], elem_id="loras",
                    widget="text")
    end_strength: float = _j(1.0, "End frame / keyframe strength", "How strongly an end image or keyframe pulls the "
                             "section that ends at it (FramePack model only; 0: not at all).",
                             env="FRAMEPACK_END_STRENGTH", flags=["--end-strength"], min=0.0, max=1.0, step=0.05,
                             elem_id="end-strength", what="end strength")
    quality_mode: bool = _j(False, "Quality Mode", "Decode each section in one pass where memory allows: no tile "
                            "seams, more VRAM.", env="FRAMEPACK_QUALITY_MODE", flags=["--quality-mode"],
                            elem_id="quality-mode")
    seed: int = _j(31337, "Seed", "the random seed: one seed, one video", env="FRAMEPACK_SEED", flags=["--seed"], min=0,
                   max=2**32 - 1, elem_id="seed", widget="number")
    seconds: float = _j(5.0, "Total video length (seconds)", "length of the video in seconds",
                        env="FRAMEPACK_VIDEO_LENGTH", flags=["--seconds", "--video-length"], min=1.0, max=120.0,
                        step=0.1, what="video length", elem_id="seconds")
    prompt_blend_sections: int = _j(0, "Prompt blending (sections)", "For timed prompts such as [0s: a cat sits] "
                                    "[2s: the cat stands up]: fade each new part in over this many sections.",
                                    env="FRAMEPACK_PROMPT_BLEND_SECTIONS", flags=["--prompt-blend-sections"], min=0,
                                    max=8, step=1, elem_id="prompt-blend", what="prompt blending")
    latent_window_size: int = _j(9, "Latent window size", "latent frames per section",
                                 env="FRAMEPACK_LATENT_WINDOW_SIZE", flags=["--latent-window-size", "--window"], min=1,
                                 max=33, step=1, section="hidden")
    steps: int = _j(25, "Steps", "Changing this is not recommended.", env="FRAMEPACK_STEPS", flags=["--steps"], min=1,
                    max=100, step=1, elem_id="steps")
    cfg: float = _j(1.0, "CFG scale", "Real guidance; above 1 uses the negative prompt and is twice as slow.",
                    env="FRAMEPACK_CFG", flags=["--cfg"], min=1.0, max=32.0, step=0.01, what="CFG")
    gs: float = _j(10.0, "Distilled CFG scale", "the guidance the model was distilled with", env="FRAMEPACK_GS",
                   flags=["--gs"], min=1.0, max=32.0, step=0.01, what="distilled CFG")
    rs: float = _j(0.0, "CFG rescale", "rescales real CFG towards the conditional prediction's spread",
                   env="FRAMEPACK_RS", flags=["--rs"], min=0.0, max=1.0, step=0.01)
    gpu_memory_preservation_gb: float = _j(
        6.0, "GPU memory preservation (GB)", "VRAM kept free when models are swapped; larger is safer, slower.",
        env="FRAMEPACK_GPU_MEMORY_PRESERVATION", flags=["--gpu-memory-preservation"], min=0.0, max=128.0, step=0.1,
        what="GPU memory preservation")
    mp4_crf: int = _j(16, "MP4 compression (CRF)", "Lower is better; 0 is lossless and can show black in some players.",
                      env="FRAMEPACK_MP4_CRF", flags=["--mp4-crf", "--crf"], min=0, max=51, step=1, what="MP4 CRF")
    resolution: int = _j(0, "Resolution", "bucket resolution (0: the model's own, 640 for the real models)",
                         env="FRAMEPACK_RESOLUTION", flags=["--resolution"], min=0, max=2048, section="hidden")
    # -- the Performance Tuning panel
    aggressive_gpu: bool = _j(False, "Aggressive GPU usage", "Larger decode chunks, half the preserved memory.",
                              env="FRAMEPACK_AGGRESSIVE_GPU", flags=["--aggressive-gpu"], section="performance")
    keep_models_in_gpu: bool = _j(False, "Keep models in GPU", "Never move a model back to the CPU between stages "
                                  "(at start-up: every model on the GPU, needs ~60 GB).",
                                  env="FRAMEPACK_KEEP_MODELS_IN_GPU", flags=["--keep-models-in-gpu"],
                                  section="performance")
    chunk_size_multiplier: float = _j(1.0, "Chunk Size Multiplier", "Scales the auto-sized VAE decode chunks "
                                      "(larger: faster, more VRAM).", env="FRAMEPACK_CHUNK_SIZE_MULTIPLIER",
                                      flags=["--chunk-size-multiplier"], min=0.5, max=3.0, step=0.1,
                                      section="performance")
    vae_attention_tokens: int = _j(2048, "Max Chunk Size", "Query tokens per attention call in the VAE decoder.",
                                   env="FRAMEPACK_MAX_CHUNK_SIZE", flags=["--max-chunk-size", "--vae-attention-tokens"],
                                   min=1024, max=8192, step=256, section="performance", what="max chunk size")
    cpu_offload_threshold_gb: float = _j(6.0, "CPU Offload Threshold (GB)", "Swap models to the CPU only above this "
                                         "much VRAM in use.", env="FRAMEPACK_CPU_OFFLOAD_THRESHOLD",
                                         flags=["--cpu-offload-threshold"], min=0.0, max=128.0, step=0.5,
                                         section="performance", what="CPU offload threshold")
    mixed_precision: bool = _j(True, "Mixed Precision Mode", "bf16 compute; off computes the transformer in float32.",
                               env="FRAMEPACK_MIXED_PRECISION", flags=["--mixed-precision"],
                               negative_flags=["--no-mixed-precision"], section="performance")
    batch_processing: bool = _j(False, "Batch Processing", "Run both CFG branches in one batch when CFG > 1.",
                                env="FRAMEPACK_BATCH_PROCESSING", flags=["--batch-processing"], section="performance")


def job_fields():
    """The per-job fields, in the order the web app shows them."""
    return fields(JobSettings)


def job_defaults(settings) -> dict:
    """Starting values of a job's controls from the settings (any object with the job fields)."""
    return {f.name: getattr(settings, f.name) for f in job_fields()}


class JobValueError(ValueError):
    """A job value out of its declared type or range; the message is one line naming the control."""


def python_type(f):
    """A settings or job field's Python type (annotations are strings here); text for anything else."""
    return {"bool": bool, "int": int, "float": float, "str": str, "list": list}.get(str(f.type), str)


def coerce(f, value: Any):
    """The value in its field's type: whole numbers for int fields (2.7 is refused, 3.0 is 3), finite numbers for
    floats, real booleans for switches; text that spells a number is accepted (API clients send text)."""
    t, what = python_type(f), f.metadata["what"]
    if t is str:
        choices = f.metadata["choices"]
        text = value.strip().lower() if isinstance(value, str) else value
        if choices and text not in choices:
            raise JobValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
        return text
    if t is bool:
        if isinstance(value, bool):
            return value
        raise JobValueError(f"{what} must be true or false, got {value!r}")
    if isinstance(value, bool) or value is None:
        raise JobValueError(f"{what} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise JobValueError(f"{what} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise JobValueError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise JobValueError(f"{what} must be a finite number, got {value}")
    if t is int:
        if value != int(value):
            raise JobValueError(f"{what} must be a whole number, got {value:g}")
        return int(value)
    return float(value)


def number(x) -> str:
    """2**32-1 as digits, 0.15 as 0.15, 5.0 as 5."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check(f, value) -> None:
    m = f.metadata
    if m["min"] is None and m["max"] is None:
        return
    lo, hi = m["min"], m["max"]
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        unit = " seconds" if f.name == "seconds" else ""
        raise JobValueError(f"{m['what']} must be between {number(lo)} and {number(hi)}{unit}, got {number(value)}")


def validate_job(job) -> None:
    """Coerce and range-check every job field of `job` in place; raises JobValueError."""
    for f in job_fields():
        value = coerce(f, getattr(job, f.name))
        check(f, value)
        setattr(job, f.name, value)
    if 0 < job.resolution < 64:
        raise JobValueError(f"resolution must be 0 (the model's own) or between 64 and 2048, got {job.resolution}")


def cache_threshold_field(cache: str) -> str | None:
    """The field `--cache-threshold` / FRAMEPACK_CACHE_THRESHOLD sets for this cache (none for "none")."""
    return CACHE_THRESHOLD_FIELDS.get(cache)
