"""Every compatibility rule fires when it should and stays quiet otherwise; the critical pause."""

import dataclasses

import pytest

from diffusers_helper.app.compat import CRITICAL, INFO, RULES, WARNING, SystemInfo, check, report
from diffusers_helper.config import Settings

H100 = SystemInfo(cuda=True, gpu_name="NVIDIA H100", capability=(9, 0), total_vram_gb=79.6, free_vram_gb=78.0)
RTX3060 = SystemInfo(cuda=True, gpu_name="RTX 3060", capability=(8, 6), total_vram_gb=12.0, free_vram_gb=11.0)
CPU = SystemInfo()


def rules_of(settings, info, env=None):
    return {f.rule: f for f in check(settings, info, env or {})}


def quiet(**kw):
    """Settings that trip nothing on an H100 (TeaCache off avoids the info note)."""
    return Settings(cache="none", **kw)


def test_quiet_baseline():
    assert rules_of(quiet(), H100) == {}


@pytest.mark.parametrize("name, settings, info, level, env", [
    ("cuda-requested-but-missing", quiet(device="cuda"), CPU, CRITICAL, None),
    ("real-models-on-cpu", quiet(), CPU, WARNING, None),
    ("keep-in-gpu-without-room", quiet(keep_models_in_gpu=True), RTX3060, WARNING, None),
    ("placement-conflict", quiet(keep_models_in_gpu=True, stream_transformer=True), H100, CRITICAL, None),
    ("preservation-exceeds-vram", quiet(gpu_memory_preservation_gb=16), RTX3060, WARNING, None),
    ("several-quantizers", quiet(enable_fp8=True, use_bnb=True), dataclasses.replace(
        H100, packages=frozenset({"bitsandbytes"})), CRITICAL, None),
    ("several-quantizers", quiet(enable_fp8=True, fp8_storage=True), H100, CRITICAL, None),
    ("bnb-needs-cuda", quiet(use_bnb=True, tiny=True), CPU, CRITICAL, None),
    ("slower-than-bf16", quiet(enable_fp8=True), H100, WARNING, None),
    ("missing-package", quiet(xformers_mode="aggressive"), H100, CRITICAL, None),
    ("fp8-without-hardware", quiet(enable_fp8=True), RTX3060, CRITICAL, None),
    ("flash-sdp-off-without-alternative", quiet(), H100, INFO, {"PYTORCH_ENABLE_FLASH_SDP": "0"}),
    ("step-cache-quality", Settings(), H100, INFO, None),
])
def test_each_rule(name, settings, info, level, env):
    found = rules_of(settings, info, env)
    assert name in found, found
    assert found[name].level == level
    assert found[name].fix  # every finding says how to fix it


def test_rules_stay_quiet_when_fixed():
    assert "missing-package" not in rules_of(quiet(xformers_mode="aggressive"),
                                             dataclasses.replace(H100, packages=frozenset({"xformers"})))
    assert "fp8-without-hardware" not in rules_of(quiet(enable_fp8=True), H100)
    assert "slower-than-bf16" not in rules_of(quiet(enable_fp8=True, enable_compile=True), H100)
    assert "slower-than-bf16" not in rules_of(quiet(use_bnb=True, bnb_load_in_4bit=True), H100)  # NF4 keeps pace
    bnb8 = rules_of(quiet(use_bnb=True), dataclasses.replace(H100, packages=frozenset({"bitsandbytes"})))
    assert "1.5x slower" in bnb8["slower-than-bf16"].message
    assert "INT4" in rules_of(quiet(enable_quant=True, quant_bits=4), H100)["slower-than-bf16"].message
    assert "keep-in-gpu-without-room" not in rules_of(quiet(keep_models_in_gpu=True), H100)
    assert "keep-in-gpu-without-room" not in rules_of(quiet(keep_models_in_gpu=True, tiny=True), RTX3060)
    assert "real-models-on-cpu" not in rules_of(quiet(tiny=True), CPU)
    assert "flash-sdp-off-without-alternative" not in rules_of(
        quiet(xformers_mode="aggressive"), dataclasses.replace(H100, packages=frozenset({"xformers"})),
        {"PYTORCH_ENABLE_FLASH_SDP": "0"})


def test_every_registered_rule_is_tested():
    tested = {p[0] for p in test_each_rule.pytestmark[0].args[1]}
    assert {name for name, _ in RULES} | {"flash-sdp-off-without-alternative"} == tested


def test_missing_package_names_each_package():
    f = rules_of(quiet(use_bnb=True, enable_tensorrt=True), H100)["missing-package"]
    assert "FRAMEPACK_USE_BNB=1 needs bitsandbytes" in f.message
    assert "FRAMEPACK_ENABLE_TENSORRT=1 needs torch_tensorrt" in f.message


def test_critical_findings_pause_unless_skipped():
    waits = []
    findings = check(quiet(device="cuda"), CPU, {})
    assert report(findings, sleep=waits.append) is True and waits == [5.0]
    waits.clear()
    assert report(findings, skip_wait=True, sleep=waits.append) is True and waits == []
    assert report(check(Settings(), H100, {}), sleep=waits.append) is False and waits == []


def test_findings_sorted_by_level():
    levels = [f.level for f in check(Settings(device="cuda", keep_models_in_gpu=True, stream_transformer=True), CPU, {})]
    assert levels == sorted(levels, key=[CRITICAL, WARNING, INFO].index)
