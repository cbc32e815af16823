"""Settings: four sources in order, validation messages, unknown variables, docs kept in sync."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from diffusers_helper.config import SettingsError, load_settings, setting_fields
from diffusers_helper.config.docs import docs_table, explain


def load(argv=(), env=None, config=None, tmp_path=None):
    cwd = tmp_path or Path("/nonexistent-dir-for-config")
    return load_settings(list(argv), env=env or {}, config_path=config, cwd=cwd)


def test_defaults_match_the_original_app(tmp_path):
    s = load(tmp_path=tmp_path).settings
    assert (s.seed, s.seconds, s.steps, s.latent_window_size) == (31337, 5.0, 25, 9)
    assert (s.cfg, s.gs, s.rs, s.gpu_memory_preservation_gb, s.mp4_crf, s.cache) == (1.0, 10.0, 0.0, 6.0, 16,
                                                                                    "teacache")
    assert s.teacache_threshold == 0.15 and s.server == "127.0.0.1"


def test_precedence_default_config_env_cli(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("steps: 30\nseed: 1\nmp4_crf: 20\ngs: 7.5\n")
    loaded = load(["--steps", "40", "--seed", "3"], env={"FRAMEPACK_STEPS": "35", "FRAMEPACK_MP4_CRF": "22"},
                  tmp_path=tmp_path)
    s, src = loaded.settings, loaded.sources
    assert s.steps == 40 and src["steps"].kind == "cli"  # cli beats env beats config
    assert s.seed == 3 and src["seed"].kind == "cli"  # cli beats config
    assert s.mp4_crf == 22 and src["mp4_crf"].kind == "env"  # env beats config
    assert s.gs == 7.5 and src["gs"].kind == "config" and "config.yaml:gs" in src["gs"].where
    assert s.rs == 0.0 and src["rs"].kind == "default"


def test_explicit_config_path_and_grouped_aliases(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("model:\n  enable_torch_compile: true\n  torch_compile_mode: max-autotune\njob:\n  steps: 12\n")
    loaded = load(["--config", str(cfg)], tmp_path=tmp_path)
    assert loaded.settings.enable_compile is True and loaded.settings.compile_mode == "max-autotune"
    assert loaded.settings.steps == 12


@pytest.mark.parametrize("env, message", [
    ({"FRAMEPACK_STEPS": "abc"}, "FRAMEPACK_STEPS='abc' is not valid (not a whole number); accepted: 1 to 100"),
    ({"FRAMEPACK_STEPS": "0"}, "FRAMEPACK_STEPS='0' is not valid (below 1); accepted: 1 to 100"),
    ({"FRAMEPACK_CFG": "99"}, "FRAMEPACK_CFG='99' is not valid (above 32.0)"),
    ({"FRAMEPACK_GS": "nan"}, "FRAMEPACK_GS='nan' is not valid (not a finite number)"),
    ({"FRAMEPACK_USE_BNB": "maybe"}, "FRAMEPACK_USE_BNB='maybe' is not valid; accepted: 1/0, true/false"),
    ({"FRAMEPACK_XFORMERS_MODE": "turbo"},
     "FRAMEPACK_XFORMERS_MODE='turbo' is not valid; accepted: standard, aggressive, off"),
    ({"FRAMEPACK_QUANT_BITS": "3"}, "FRAMEPACK_QUANT_BITS='3' is not valid; accepted: 4, 8"),
    ({"FRAMEPACK_PORT": "70000"}, "FRAMEPACK_PORT='70000' is not valid (above 65535)"),
    ({"PYTORCH_ENABLE_FLASH_SDP": "sometimes"}, "PYTORCH_ENABLE_FLASH_SDP='sometimes' is not valid"),
])
def test_invalid_values_name_variable_value_and_accepted(env, message, tmp_path):
    with pytest.raises(SettingsError) as info:
        load(env=env, tmp_path=tmp_path)
    assert message in str(info.value)


def test_invalid_cli_and_config_values(tmp_path):
    with pytest.raises(SettingsError, match=r"--steps='-1' is not valid \(below 1\)"):
        load(["--steps", "-1"], tmp_path=tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("seed: [1, 2]\n")
    with pytest.raises(SettingsError, match="config.yaml:seed"):
        load(tmp_path=tmp_path)
    cfg.write_text("stepz: 3\n")
    with pytest.raises(SettingsError, match="unknown setting 'stepz'; did you mean 'steps'"):
        load(tmp_path=tmp_path)
    cfg.write_text("steps: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load(tmp_path=tmp_path)
    with pytest.raises(SettingsError, match="config file not found"):
        load(["--config", str(tmp_path / "missing.yaml")], tmp_path=tmp_path)


def test_unknown_variable_suggests_nearest(tmp_path):
    loaded = load(env={"FRAMEPACK_XFORMER_MODE": "off", "FRAMEPACK_TOTALLY_NEW": "1"}, tmp_path=tmp_path)
    assert "unknown environment variable FRAMEPACK_XFORMER_MODE; did you mean FRAMEPACK_XFORMERS_MODE?" \
        in loaded.warnings
    assert "unknown environment variable FRAMEPACK_TOTALLY_NEW" in loaded.warnings


def test_unsupported_settings_say_so(tmp_path):
    loaded = load(env={"FRAMEPACK_ENABLE_KV_CACHE": "1", "FRAMEPACK_JIT_MODE": "trace"}, tmp_path=tmp_path)
    text = "\n".join(loaded.warnings)
    assert "FRAMEPACK_ENABLE_KV_CACHE: not offered (FramePack's text tokens are modulated by the timestep" in text
    assert "FRAMEPACK_JIT_MODE: not offered (TorchScript" in text
    # nothing is left "planned": every setting is built or says why it is not offered
    assert not [f.name for f in setting_fields() if f.metadata["status"] == "planned"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.yaml").write_text("jit_save: out.pt\nsteps: 12\n")
    flag_and_file = load(["--jit-mode", "script", "--disable-sim-cache"], tmp_path=tmp_path / "c")
    text = "\n".join(flag_and_file.warnings)
    assert "--jit-mode: not offered" in text and "'script' has no effect" in text and "--enable-sim-cache" in text
    assert "config.yaml:jit_save: not offered" in text and flag_and_file.settings.steps == 12
    # setting an active option, or an older spelling of one, warns about nothing
    assert load(env={"FRAMEPACK_STEPS": "20", "FRAMEPACK_ENABLE_FBCACHE": "0"}, tmp_path=tmp_path).warnings == []


def test_booleans_and_lists(tmp_path):
    s = load(env={"FRAMEPACK_USE_TEACACHE": "off", "FRAMEPACK_FP8_EXCLUDE_KEYS": "norm, proj ,,embed"},
             tmp_path=tmp_path).settings
    assert s.cache == "none" and s.fp8_exclude_keys == ["norm", "proj", "embed"]


def test_cache_choice_and_its_older_spellings(tmp_path):
    assert load(["--no-teacache"], tmp_path=tmp_path).settings.cache == "none"
    assert load(["--cache", "magcache"], env={"FRAMEPACK_USE_TEACACHE": "0"}, tmp_path=tmp_path).settings.cache == \
        "magcache"  # the flag wins over the variable
    assert load(env={"FRAMEPACK_ENABLE_FBCACHE": "1"}, tmp_path=tmp_path).settings.cache == "fbcache"
    assert load(env={"FRAMEPACK_ENABLE_FBCACHE": "0"}, tmp_path=tmp_path).settings.cache == "teacache"  # untouched
    assert load(["--disable-fbcache"], env={"FRAMEPACK_ENABLE_FBCACHE": "1"}, tmp_path=tmp_path).settings.cache == \
        "teacache"
    (tmp_path / "config.yaml").write_text("use_teacache: false\n")
    assert load(tmp_path=tmp_path).settings.cache == "none"
    # --cache-threshold sets the chosen cache's own knob, from the variable or the flag
    s = load(["--cache", "magcache", "--cache-threshold", "0.2"], tmp_path=tmp_path).settings
    assert (s.magcache_threshold, s.teacache_threshold) == (0.2, 0.15)
    s = load(["--cache=taylorseer"], env={"FRAMEPACK_CACHE_THRESHOLD": "3"}, tmp_path=tmp_path).settings
    assert s.taylorseer_interval == 3
    with pytest.raises(SettingsError, match="FRAMEPACK_CACHE"):
        load(env={"FRAMEPACK_CACHE": "fastest"}, tmp_path=tmp_path)
    loaded = load(["--cache", "none", "--cache-threshold", "0.3"], tmp_path=tmp_path)
    assert any("no step cache is chosen" in w for w in loaded.warnings)


def test_every_seed_variable_and_flag_is_known():
    from diffusers_helper.config.load import SHORTCUT_FLAGS, SHORTCUTS, build_parser
    from diffusers_helper.config.schema import NOT_OFFERED

    envs = {f.metadata["env"] for f in setting_fields()} | {n.env for n in NOT_OFFERED} | set(SHORTCUTS)
    flags = {fl for f in setting_fields() for fl in f.metadata["flags"] + f.metadata["negative_flags"]}
    flags |= {fl for n in NOT_OFFERED for fl in n.flags} | set(SHORTCUT_FLAGS)
    flags |= {fl for f in setting_fields() for fl in f.metadata.get("const_flags", {})}
    assert flags <= {o for a in build_parser()._actions for o in a.option_strings}
    seed_dir = REPO.parent / "shared" / "seeds"
    if not seed_dir.is_dir():
        pytest.skip("seed documents not present")
    named = set()
    flag_names = set()
    for path in seed_dir.glob("*.txt"):
        if path.name.startswith("003"):
            continue  # seed 003 is about another product (WAN22)
        text = path.read_text()
        named |= set(re.findall(r"\bFRAMEPACK_[A-Z0-9_]+\b(?!\.md)", text))  # not file names
        flag_names |= set(re.findall(r"python demo_gradio\.py([^\n`]*)", text))
    assert named and named <= envs, sorted(named - envs)
    used_flags = {tok.split("=")[0] for line in flag_names for tok in line.split() if tok.startswith("--")}
    assert used_flags <= flags, sorted(used_flags - flags)
    for flag in ("--disable-fbcache", "--disable-sim-cache", "--disable-kv-cache", "--xformers-mode", "--jit-mode",
                 "--enforce-low-precision", "--fast-start", "--use-memory-v2", "--enable-tensorrt"):
        assert flag in flags


def test_docs_table_in_sync():
    text = (REPO / "docs" / "settings.md").read_text()
    block = text.split("<!-- settings-table:start -->\n", 1)[1].split("<!-- settings-table:end -->", 1)[0]
    assert block == docs_table(), "regenerate docs/settings.md: python -m diffusers_helper.settings --docs"


def test_explain_lists_values_and_sources(tmp_path):
    loaded = load(["--seed", "5"], env={"FRAMEPACK_STEPS": "30", "FRAMEPACK_ENABLE_FBCACHE": "1"}, tmp_path=tmp_path)
    out = explain(loaded)
    assert re.search(r"seed\s+5\s+cli \(--seed\)", out)
    assert re.search(r"steps\s+30\s+env \(FRAMEPACK_STEPS\)", out)
    assert re.search(r"cache\s+'fbcache'\s+env \(FRAMEPACK_ENABLE_FBCACHE\)", out)
    assert "mp4_crf" not in out and "mp4_crf" in explain(loaded, all_settings=True)


def test_explain_command_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "FRAMEPACK_STEPS": "30", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "diffusers_helper.settings", "--explain", "--seed", "9"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FRAMEPACK_STEPS" in proc.stdout and "--seed" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "diffusers_helper.settings", "--explain"], capture_output=True,
                         text=True, env={**env, "FRAMEPACK_STEPS": "x"}, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: FRAMEPACK_STEPS='x'")
    assert len(bad.stderr.strip().splitlines()) == 1
