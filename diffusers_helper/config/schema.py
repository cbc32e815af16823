"""Every knob users set, declared once: type, default, limits, variable, flags, status.

The loader (`load.py`), the docs table and `--explain` (`docs.py`) all read this one table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .job import JobSettings

ACTIVE = "active"
PLANNED = "planned"  # the feature is not built yet: say so instead of ignoring the value
UNSUPPORTED = "unsupported"  # deliberately not offered; the reason says why

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A bad value: names the variable, the value and what is accepted. Stops start-up."""


def _s(default, env=None, flags=(), help="", *, choices=None, min=None, max=None, status=ACTIVE, note="",
       group="general", aliases=(), negative_flags=(), kind=None):
    """Field with the metadata the parser, validator and docs read."""
    meta = dict(env=env, flags=tuple(flags), help=help, choices=choices, min=min, max=max, status=status, note=note,
                group=group, aliases=tuple(aliases), negative_flags=tuple(negative_flags), kind=kind)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_KV = ("FramePack's text tokens are modulated by the timestep in every dual-stream block before their keys and "
       "values are formed, so those change at every step (docs/performance.md has the measured change): reusing "
       "them would be an approximation, not a cache; the step caches (--cache) are the approximations on offer")
_RUNTIME = ("a step cache's state is one section's residuals, valid for no other section or job; what does persist "
            "is the optimized-model cache and the compile cache")


@dataclass
class Settings(JobSettings):
    """The app's settings; the per-job controls' defaults come first, inherited from `JobSettings`."""

    # -- app and files ------------------------------------------------------------------------------
    model: str = _s("framepack", "FRAMEPACK_MODEL", ["--model"], "model to load first",
                    choices=("framepack", "f1", "tiny", "tiny-f1"))
    tiny: bool = _s(False, "FRAMEPACK_TINY", ["--tiny"], "use the small offline models (no download)")
    models_dir: str = _s("", "FRAMEPACK_MODELS_DIR", ["--models-dir"], "local folder laid out like the HF repos",
                         kind="path")
    cache_dir: str = _s("cache", "FRAMEPACK_CACHE_DIR", ["--cache-dir"], "where the tiny models and caches live",
                        kind="path")
    output_dir: str = _s("outputs", "FRAMEPACK_OUTPUT_DIR", ["--output-dir"], "where videos are written",
                         kind="path")
    lora_dir: str = _s("loras", "FRAMEPACK_LORA_DIR", ["--lora-dir"], "the LoRA files (.safetensors) jobs can "
                       "choose by name", kind="path")
    offline: bool = _s(False, "FRAMEPACK_OFFLINE", ["--offline"], "never download (same as HF_HUB_OFFLINE=1)")
    device: str = _s("auto", "FRAMEPACK_DEVICE", ["--device"], "auto, cpu, cuda or cuda:N")
    server: str = _s("127.0.0.1", "FRAMEPACK_SERVER", ["--server"], "address the web app binds to")
    port: int = _s(0, "FRAMEPACK_PORT", ["--port"], "web app port (0: 7860 or the next free one)", min=0, max=65535)
    share: bool = _s(False, "FRAMEPACK_SHARE", ["--share"], "make a public Gradio link")
    inbrowser: bool = _s(False, "FRAMEPACK_INBROWSER", ["--inbrowser"], "open a browser tab at start")
    auth: str = _s("", "FRAMEPACK_AUTH", ["--auth"], "sign-in for the web app and its API: user:password pairs, "
                   "comma-separated (each user then sees and cancels only their own jobs)")
    auth_file: str = _s("", "FRAMEPACK_AUTH_FILE", ["--auth-file"], "a file with one user:password per line, "
                        "read at start-up (keeps passwords out of the process list)", kind="path")
    admin_users: list = _s([], "FRAMEPACK_ADMIN_USERS", ["--admin-users"], "users who see and cancel every job",
                           kind="csv")
    max_upload_mb: int = _s(50, "FRAMEPACK_MAX_UPLOAD_MB", ["--max-upload-mb"], "largest upload the web app accepts "
                            "(MB)", min=1, max=10000)
    skip_compat_wait: bool = _s(False, "FRAMEPACK_SKIP_COMPAT_WAIT", ["--no-compat-wait"],
                                "do not pause 5 s after a critical compatibility finding")
    log_level: str = _s("INFO", "FRAMEPACK_LOG_LEVEL", ["--log-level"], "logging level",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    # -- memory ------------------------------------------------------------------------------------------
    placement: str = _s("auto", "FRAMEPACK_PLACEMENT", ["--placement"],
                        "model placement policy: auto, full or swap", choices=("auto", "full", "swap"),
                        group="memory")
    stream_transformer: bool = _s(False, "FRAMEPACK_USE_MEMORY_V2", ["--use-memory-v2", "--stream-transformer"],
                                  "stream the transformer with pinned memory and prefetch (the swap policy)",
                                  group="memory")
    vae_device: str = _s("", "FRAMEPACK_VAE_DEVICE", ["--vae-device"],
                         "a device of its own for the VAE, e.g. cuda:1 (empty: the compute device); it then decodes "
                         "each section while the next one samples", group="memory")
    text_encoder_device: str = _s("", "FRAMEPACK_TEXT_ENCODER_DEVICE", ["--text-encoder-device"],
                                  "a device of its own for the two text encoders, e.g. cuda:1 (empty: the compute "
                                  "device); frees about 16 GB on the compute GPU", group="memory")
    image_encoder_device: str = _s("", "FRAMEPACK_IMAGE_ENCODER_DEVICE", ["--image-encoder-device"],
                                   "a device of its own for the SigLIP image encoder (empty: the compute device)",
                                   group="memory")
    fp8_storage: bool = _s(False, "FRAMEPACK_FP8_STORAGE", ["--fp8-storage"],
                           "store transformer weights in FP8 and compute in bf16 (half the weight memory)",
                           group="memory")

    # -- speed: attention, compile, precision ------------------------------------------------------------
    xformers_mode: str = _s("standard", "FRAMEPACK_XFORMERS_MODE", ["--xformers-mode"],
                            "standard: fastest PyTorch SDPA kernel; aggressive: xFormers; off: plain math",
                            choices=("standard", "aggressive", "off"), group="speed")
    attention_backend: str = _s("auto", "FRAMEPACK_ATTENTION_BACKEND", ["--attention-backend"],
                                "attention kernel through diffusers' dispatcher (auto: from xformers_mode and the GPU)",
                                choices=("auto", "native", "cudnn", "flash", "efficient", "math", "xformers", "sage",
                                         "sage-fp8", "flash-attn", "fa3"), group="speed")
    enable_compile: bool = _s(False, "FRAMEPACK_ENABLE_COMPILE", ["--enable-compile"],
                              "torch.compile the repeated transformer blocks (kernels cached on disk)", group="speed")
    compile_mode: str = _s("default", "FRAMEPACK_COMPILE_MODE", ["--compile-mode"], "torch.compile mode",
                           choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                           group="speed")
    fast_start: bool = _s(False, "FRAMEPACK_FAST_START", ["--fast-start"],
                          "skip the compile warm-up and the optimized-model cache at start-up (the first job "
                          "compiles instead)", group="speed")
    tf32: bool = _s(True, "FRAMEPACK_TF32", ["--tf32"], "TF32 matmuls for float32 work on Ampere+",
                    group="speed", negative_flags=["--no-tf32"])
    cudnn_benchmark: bool = _s(True, "FRAMEPACK_CUDNN_BENCHMARK", ["--cudnn-benchmark"],
                               "let cuDNN pick the fastest convolution (VAE) per shape", group="speed",
                               negative_flags=["--no-cudnn-benchmark"])

    # -- quantization ---------------------------------------------------------------------------------------
    enable_fp8: bool = _s(False, "FRAMEPACK_ENABLE_FP8", ["--enable-fp8"],
                          "row-wise FP8 linears in the transformer blocks (FP8 matmuls on Ada/Hopper+)",
                          group="quant")
    fp8_target_keys: list = _s([], "FRAMEPACK_FP8_TARGET_KEYS", ["--fp8-target-keys"],
                               "comma-separated module-name parts to convert (empty: all linears)", group="quant",
                               kind="csv")
    fp8_exclude_keys: list = _s(["norm"], "FRAMEPACK_FP8_EXCLUDE_KEYS", ["--fp8-exclude-keys"],
                                "comma-separated module-name parts to keep in bf16", group="quant", kind="csv")
    fp8_use_scaled_mm: bool = _s(True, "FRAMEPACK_FP8_USE_SCALED_MM", ["--fp8-use-scaled-mm"],
                                 "row-wise scaled FP8 matmul (torch._scaled_mm)", group="quant")
    enable_quant: bool = _s(False, "FRAMEPACK_ENABLE_QUANT", ["--enable-quant"],
                            "torchao integer linears in the transformer blocks (needs torchao)", group="quant")
    quant_bits: int = _s(8, "FRAMEPACK_QUANT_BITS", ["--quant-bits"],
                         "8: int8 weights and activations (int8 matmuls); 4: int4 weights (memory, slower)",
                         choices=(4, 8), group="quant")
    use_bnb: bool = _s(False, "FRAMEPACK_USE_BNB", ["--use-bnb"],
                       "bitsandbytes 8-bit transformer, quantized while loading (CUDA only; saves memory, slower)",
                       group="quant")
    bnb_load_in_4bit: bool = _s(False, "FRAMEPACK_BNB_LOAD_IN_4BIT", ["--bnb-load-in-4bit"],
                                "bitsandbytes 4-bit (NF4) instead of 8-bit", group="quant")
    bnb_double_quant: bool = _s(False, "FRAMEPACK_BNB_DOUBLE_QUANT", ["--bnb-double-quant"],
                                "bitsandbytes nested quantization", group="quant")
    enable_opt_cache: bool = _s(False, "FRAMEPACK_ENABLE_OPT_CACHE", ["--enable-opt-cache"],
                                "save the FP8 or torchao-quantized transformer once and load it directly next time",
                                group="quant")
    optimized_transformer: str = _s("optimized_models", "FRAMEPACK_OPTIMIZED_TRANSFORMER",
                                    ["--optimized-transformer"],
                                    "folder (one file per model and options) or file for the optimized transformer",
                                    group="quant", kind="path")
    enable_module_cache: bool = _s(True, "FRAMEPACK_ENABLE_MODULE_CACHE", ["--enable-module-cache"],
                                   "keep torch.compile's kernels in the project cache between launches (off: "
                                   "PyTorch's temporary folder)", group="quant",
                                   negative_flags=["--disable-module-cache"])

    # -- VAE decode ---------------------------------------------------------------------------------------------
    async_decode: str = _s("auto", "FRAMEPACK_ASYNC_DECODE", ["--async-decode"],
                           "decode a section while the next one samples (auto: when the VAE has a device of its "
                           "own, or on a GPU with every model resident)", choices=("auto", "on", "off"),
                           group="vae")
    vae_backend: str = _s("exact", "FRAMEPACK_VAE_BACKEND", ["--vae-backend"],
                          "exact: layer-wise, equal to the stock decode in less memory; stock: vae.decode; "
                          "compiled: stock with torch.compile; tensorrt: TensorRT with fallback to exact",
                          choices=("exact", "stock", "compiled", "tensorrt"), group="vae")
    vae_chunk_size: int = _s(0, "FRAMEPACK_VAE_CHUNK_SIZE", ["--vae-chunk-size"],
                             "latent frames per decode chunk (0: sized from free VRAM)", min=0, max=64,
                             group="vae")
    vae_chunk_reserve_gb: float = _s(2.0, "FRAMEPACK_VAE_CHUNK_RESERVE_GB", [], "VRAM kept free when sizing chunks",
                                     min=0.0, max=128.0, group="vae")
    vae_chunk_safety: float = _s(1.2, "FRAMEPACK_VAE_CHUNK_SAFETY", [], "multiplier on the estimated chunk memory",
                                 min=1.0, max=4.0, group="vae")
    vae_upscale_factor: int = _s(8, "FRAMEPACK_VAE_UPSCALE_FACTOR", [],
                                 "pixels per latent in the decode memory estimate (the VAE's 8x)",
                                 choices=(8,), group="vae")

    # -- TensorRT / ONNX ----------------------------------------------------------------------------------------
    enable_tensorrt: bool = _s(False, "FRAMEPACK_ENABLE_TENSORRT", ["--enable-tensorrt"],
                               "TensorRT VAE decoder with fallback", group="tensorrt")
    tensorrt_cache_dir: str = _s("cache/trt_cache", "FRAMEPACK_TENSORRT_CACHE_DIR", [], "engine cache",
                                 group="tensorrt", kind="path")
    trt_workspace_mb: int = _s(4096, "FRAMEPACK_TRT_WORKSPACE_MB", [], "builder workspace", min=256, max=1 << 20,
                               group="tensorrt")
    trt_max_aux_streams: int = _s(2, "FRAMEPACK_TRT_MAX_AUX_STREAMS", [], "auxiliary streams", min=0, max=16,
                                  group="tensorrt")
    trt_max_cached_shapes: int = _s(8, "FRAMEPACK_TRT_MAX_CACHED_SHAPES", [], "engines kept per shape cache",
                                    min=1, max=256, group="tensorrt")

    # -- several GPUs -------------------------------------------------------------------------------------------
    cp_gpus: int = _s(1, "FRAMEPACK_CP_GPUS", ["--cp-gpus"], "GPUs that share each transformer forward of one video "
                      "(context parallel; 1: off). The app starts the extra ranks itself", min=1, max=8,
                      group="gpus")
    cp_attention: str = _s("ulysses", "FRAMEPACK_CP_ATTENTION", ["--cp-attention"], "how context-parallel ranks "
                           "share attention: ulysses (all-to-all of heads) or ring (key/value passed around)",
                           choices=("ulysses", "ring"), group="gpus")
    workers: int = _s(0, "FRAMEPACK_WORKERS", ["--workers"], "job workers, each running whole jobs on its own GPU "
                      "with its own models (a Ray pool): 0 = one per GPU when Ray is installed and there are two GPUs "
                      "or more (with --ray-address: one per GPU of the cluster), 1 = one in-process worker, N = N "
                      "workers (CPU workers where there is no GPU)", min=0, max=64, group="gpus")
    ray_address: str = _s("", "FRAMEPACK_RAY_ADDRESS", ["--ray-address"], "join this Ray cluster (e.g. "
                          "10.0.0.5:6379, started with `ray start --head`) so the GPUs of several machines serve one "
                          "UI; empty: a local Ray instance of this machine", group="gpus")

# Names other FramePack builds use for the same setting in config.yaml; resolved on read.
CONFIG_ALIASES = {
    "video_length": "seconds",
    "gpu_memory_preservation": "gpu_memory_preservation_gb",
    "enable_torch_compile": "enable_compile",
    "torch_compile_mode": "compile_mode",
    "use_memory_v2": "stream_transformer",
    "max_chunk_size": "vae_attention_tokens",
    "enable_cpu_offload": "stream_transformer",
    "low_vram": "stream_transformer",
}
# Plain PyTorch variables FramePack guides tell users to set; read here so they are not silently ignored.
TORCH_ENV = {
    "PYTORCH_ENABLE_FLASH_SDP": "flash attention kernel of PyTorch SDPA (0 disables it)",
    "PYTORCH_ENABLE_MEM_EFFICIENT_SDP": "memory-efficient kernel of PyTorch SDPA (0 disables it)",
    "PYTORCH_CUDA_ALLOC_CONF": "CUDA caching allocator options, read by PyTorch itself",
}


@dataclass(frozen=True)
class NotOffered:
    """A setting other FramePack builds have that this one deliberately does not: it is still recognised (so a
    value set for it is never silently ignored), warns that it has no effect, and is listed with its reason."""

    name: str
    env: str
    flags: tuple[str, ...] = ()
    reason: str = ""
    takes_value: bool = True


_TORCHSCRIPT = ("TorchScript is deprecated in PyTorch and cannot trace diffusers' hooked transformer; use "
                "FRAMEPACK_ENABLE_COMPILE=1")
_SIM = ("TeaCache and the step caches cover step reuse; a cosine-similarity cache of whole outputs has no published "
        "FramePack calibration")
_TRT = ("the 13B transformer with its history inputs does not export to a static TensorRT engine; torch.compile and "
        "FP8 are the transformer path (the VAE has FRAMEPACK_ENABLE_TENSORRT)")
_LOADERS = "model parts load one after another; parallel loading has not been built or measured"
NOT_OFFERED = [
    NotOffered("jit_mode", "FRAMEPACK_JIT_MODE", ("--jit-mode",), _TORCHSCRIPT),
    NotOffered("jit_artifact", "FRAMEPACK_JIT_ARTIFACT", (), _TORCHSCRIPT),
    NotOffered("jit_save", "FRAMEPACK_JIT_SAVE", (), _TORCHSCRIPT),
    NotOffered("jit_load", "FRAMEPACK_JIT_LOAD", (), _TORCHSCRIPT),
    NotOffered("jit_strict", "FRAMEPACK_JIT_STRICT", (), _TORCHSCRIPT),
    NotOffered("enforce_low_precision", "FRAMEPACK_ENFORCE_LOW_PRECISION", ("--enforce-low-precision",),
               "every model already loads in bf16 or fp16; the float32 layers left are the ones diffusers keeps in "
               "float32 for accuracy", takes_value=False),
    NotOffered("enable_prune", "FRAMEPACK_ENABLE_PRUNE", ("--enable-prune",),
               "removing layers of a distilled 13B model changes its output", takes_value=False),
    NotOffered("bnb_cpu_offload", "FRAMEPACK_BNB_CPU_OFFLOAD", ("--bnb-cpu-offload",),
               "the swap placement already moves a bitsandbytes transformer to the CPU when another model needs the "
               "room", takes_value=False),
    NotOffered("bnb_device_map", "FRAMEPACK_BNB_DEVICE_MAP", ("--bnb-device-map",),
               "the memory manager places the bitsandbytes transformer; its kernels cannot run on the CPU"),
    NotOffered("enable_sim_cache", "FRAMEPACK_ENABLE_SIM_CACHE", ("--enable-sim-cache", "--disable-sim-cache"), _SIM,
               takes_value=False),
    *(NotOffered(n, f"FRAMEPACK_{n.upper()}", (), _SIM) for n in (
        "sim_cache_threshold", "sim_cache_max_skip", "sim_cache_max_entries", "sim_cache_use_faiss",
        "sim_cache_verbose")),
    NotOffered("trt_transformer", "FRAMEPACK_TRT_TRANSFORMER", (), _TRT),
    NotOffered("trt_text_encoders", "FRAMEPACK_TRT_TEXT_ENCODERS", (),
               "text encoding runs once per job, well under 1% of its time"),
    *(NotOffered(n, f"FRAMEPACK_{n.upper()}", (), _TRT) for n in (
        "use_onnx_engines", "onnx_trt_enable", "onnx_trt_fp16", "onnx_trt_int8", "onnx_trt_device_id",
        "onnx_trt_workspace_mb", "onnx_trt_cache_dir")),
    *(NotOffered(n, f"FRAMEPACK_{n.upper()}", (), _LOADERS) for n in (
        "parallel_loaders", "preload_repos", "force_parallel_loaders")),
    NotOffered("fbcache_verbose", "FRAMEPACK_FBCACHE_VERBOSE", (),
               "every step cache logs each section's computed steps, and the job's sidecar lists them"),
    NotOffered("enable_kv_cache", "FRAMEPACK_ENABLE_KV_CACHE", ("--enable-kv-cache", "--disable-kv-cache"), _KV,
               takes_value=False),
    *(NotOffered(n, f"FRAMEPACK_{n.upper()}", (), _KV) for n in ("kv_cache_len", "kv_cache_verbose")),
    *(NotOffered(n, f"FRAMEPACK_{n.upper()}", (), _RUNTIME) for n in ("runtime_cache", "runtime_cache_dir")),
]
