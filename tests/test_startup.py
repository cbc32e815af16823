"""start.sh argument handling (dry run) and what start-up derives from settings."""

import os
import sys
import subprocess


from conftest import REPO
from diffusers_helper.config import Settings
from diffusers_helper.app.startup import apply_runtime_flags, model_name, placement_override


def dry_run(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAMEPACK_", "PYTORCH_"))}
    full_env.update(env or {})
    proc = subprocess.run(["bash", str(REPO / "start.sh"), *args, "--dry-run"], capture_output=True, text=True,
                          env=full_env, timeout=30)
    return proc.returncode, proc.stdout, proc.stderr


def test_default_preset_passes_arguments_through():
    code, out, _ = dry_run("--tiny", "--port", "7999")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == "preset: default"
    assert lines[-1].split()[1:] == ["demo_gradio.py", "--tiny", "--port", "7999"]


def test_low_vram_preset_sets_memory_variables():
    code, out, _ = dry_run("low-vram", "--share")
    assert code == 0
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,max_split_size_mb=128" in out
    assert "FRAMEPACK_USE_MEMORY_V2=1" in out and "FRAMEPACK_VAE_CHUNK_SIZE=1" in out
    assert out.strip().splitlines()[-1].endswith("demo_gradio.py --share")


def test_preset_flag_and_user_values_win():
    code, out, _ = dry_run("--preset", "max-speed", env={"FRAMEPACK_ENABLE_FP8": "0"})
    assert code == 0 and "FRAMEPACK_ENABLE_FP8=0" in out and "FRAMEPACK_ENABLE_COMPILE=1" in out


def test_unknown_preset_is_an_error():
    code, out, err = dry_run("turbo")
    assert code == 2 and "unknown preset 'turbo'" in err and out == ""


def test_placement_override_from_settings():
    assert placement_override(Settings()) is None
    assert placement_override(Settings(keep_models_in_gpu=True)) == "full"
    assert placement_override(Settings(stream_transformer=True)) == "swap"
    assert placement_override(Settings(placement="swap", keep_models_in_gpu=True)) == "swap"


def test_model_name_with_tiny():
    assert model_name(Settings()) == "framepack"
    assert model_name(Settings(tiny=True)) == "tiny"
    assert model_name(Settings(tiny=True, model="f1")) == "tiny-f1"


def test_runtime_flags_applied_and_logged():
    import torch

    lines = apply_runtime_flags(Settings(tf32=False, cudnn_benchmark=False),
                                env={"PYTORCH_ENABLE_FLASH_SDP": "0", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    try:
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.benchmark is False
        assert torch.backends.cuda.flash_sdp_enabled() is False
        assert "TF32 matmuls off" in lines and any("flash kernel off" in l for l in lines)
        assert "CUDA allocator: expandable_segments:True" in lines
    finally:
        apply_runtime_flags(Settings(), env={"PYTORCH_ENABLE_FLASH_SDP": "1"})
    assert torch.backends.cuda.flash_sdp_enabled() is True


def test_app_rejects_a_bad_setting_with_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEPACK_")}
    env.update(FRAMEPACK_STEPS="lots", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "demo_gradio.py"), "--tiny"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: FRAMEPACK_STEPS='lots' is not valid (not a whole number); accepted: 1 to 100"


def test_default_start_prints_no_warnings_from_libraries_it_did_not_enable(tiny_root, tmp_path):
    """torchao and bitsandbytes are installed here (the test requirements), but a default start enables neither:
    their import-time warnings, and diffusers' notice about attention backends, must not reach the user."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEPACK_")}
    env.update(FRAMEPACK_CACHE_DIR=str(tiny_root.parent), FRAMEPACK_OUTPUT_DIR=str(tmp_path))
    code = "import demo_gradio; demo_gradio.create(['--tiny'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stderr
    assert "Loading tiny models" in log and "Transformer placement: full" in log  # our decisions are logged
    for noise in ("torchao", "bitsandbytes", "triton", "Attention backends are an experimental", "Traceback"):
        assert noise.lower() not in log.lower(), noise
