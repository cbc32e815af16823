"""A device per model: declared, checked, logged; a model on its own device is never moved by the policy."""

import threading
import time

import pytest
import torch

from conftest import FakeBundle, FakeModel, oom_once
from diffusers_helper.memory.placement import Placement, check_device, model_devices
from diffusers_helper.models.loading import load_models
from diffusers_helper.models.tiny import build_tiny_transformer, tiny_spec
from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.events import Finished, Stage
from diffusers_helper.pipeline.request import GenerationRequest

OTHER = torch.device("cpu", 1)  # a second "device" on a machine without GPUs: distinct for the placement


def _two_gpus(monkeypatch, count=2):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_devices_are_checked_with_one_line(monkeypatch):
    with pytest.raises(ValueError, match="'quantum' is not a device"):
        check_device("quantum")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        model_devices(torch.device("cpu"), {"vae": "cuda:1"})
    _two_gpus(monkeypatch, 1)
    with pytest.raises(ValueError, match=r"1 CUDA GPU\(s\), cuda:0 to cuda:0"):
        model_devices(torch.device("cuda", 0), {"vae": "cuda:1"})
    with pytest.raises(ValueError, match="unknown model"):
        model_devices(torch.device("cuda", 0), {"transformer": "cuda:0"})


def test_declared_devices(monkeypatch):
    _two_gpus(monkeypatch)
    compute = torch.device("cuda", 0)
    assert model_devices(compute, {"vae": "cuda:1", "image_encoder": "", "text_encoder": None}) == {
        "vae": torch.device("cuda", 1)}
    assert model_devices(compute, {"vae": "cuda:0"}) == {}  # the compute device is no device of its own
    both = model_devices(compute, {"text_encoder": "cuda:1"})
    assert both == {"text_encoder": torch.device("cuda", 1), "text_encoder_2": torch.device("cuda", 1)}
    placement = Placement(compute, "full", devices=both)
    assert placement.describe() == "image_encoder, transformer, vae on cuda:0; text_encoder, text_encoder_2 on cuda:1"


def test_own_device_models_are_placed_once_and_never_offloaded():
    vae, llama, clip = FakeModel(), FakeModel(), FakeModel()
    bundle = FakeBundle(vae=vae, text_encoder_2=clip, image_encoder=llama)
    placement = Placement(torch.device("cpu"), "swap", probe=lambda: (0, 1 << 40), devices={"vae": OTHER})
    placement.prepare(bundle)
    assert vae.moves == [str(OTHER)]
    placement.use(bundle, "image_encoder")  # no room: every other model on the compute device goes to the CPU
    placement.use(bundle, "text_encoder_2")
    assert vae.moves == [str(OTHER)] and llama.moves[-1] == "cpu"
    full = Placement(torch.device("cpu"), "full", devices={"vae": OTHER})
    vae.moves.clear()
    full.prepare(bundle)
    assert vae.moves == [str(OTHER)] and clip.moves[-1] == "cpu"


def _request(image, **kw):
    return GenerationRequest(**{**dict(prompt="a cat", image=image, seconds=2.4, steps=2, seed=5,
                                       cache="none", gpu_memory_preservation_gb=0), **kw})


def test_vae_on_its_own_device_decodes_in_the_background(tiny_bundles, tmp_path, test_image, caplog,
                                                        encoded_frames):
    same = Engine(tiny_bundles["tiny"], Placement(torch.device("cpu"), "full"), outputs_dir=tmp_path / "a")
    with caplog.at_level("INFO"):
        own = Engine(tiny_bundles["tiny"], Placement(torch.device("cpu"), "full", devices={"vae": OTHER}),
                     outputs_dir=tmp_path / "b")
    assert not same.background_decode and own.background_decode  # async decode "auto"
    assert "Decoding on cpu:1 while cpu samples the next section" in caplog.text
    a = same.generate(_request(test_image), lambda e: None)
    b = own.generate(_request(test_image), lambda e: None)
    assert isinstance(b, Finished) and b.frames == a.frames
    assert (encoded_frames(a) == encoded_frames(b)).all()  # the same kernels on the same CPU


def test_oom_step_down_waits_for_the_decode_thread(tiny_root, tmp_path, test_image):
    """Full placement decoding in the background; an OOM in section 2 moves models to the CPU. The step-down
    must wait until section 1's decode is over, then decode in turn (the VAE shares the compute device)."""
    bundle = load_models(tiny_spec("tiny", tiny_root))  # placement hooks stay on the models: a fresh bundle
    bundle.transformer = build_tiny_transformer(7, num_layers=2, num_single_layers=2).eval().requires_grad_(False)
    engine = Engine(bundle, Placement(torch.device("cpu"), "full", probe=lambda: (1 << 40, 0)),
                    outputs_dir=tmp_path, async_decode="on")
    decoding = threading.Event()
    overlaps = []
    real_decode, real_degrade = engine.decoder.decode, engine.placement.degrade

    def slow_decode(latents, quality=False):
        decoding.set()
        time.sleep(0.5)
        try:
            return real_decode(latents, quality=quality)
        finally:
            decoding.clear()

    def degrade(b):
        overlaps.append(decoding.is_set())
        return real_degrade(b)

    engine.decoder.decode = slow_decode
    engine.placement.degrade = degrade
    real_forward = bundle.transformer.forward
    calls = {"n": 0}

    def oom_in_section_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # 2 steps a section: the first call of section 2
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_forward(*args, **kwargs)

    bundle.transformer.forward = oom_in_section_two
    events = []
    final = engine.generate(_request(test_image), events.append)
    assert isinstance(final, Finished) and final.frames == 73
    assert overlaps == [False]  # the step-down never ran while the decode thread used the VAE
    assert engine.placement.policy == "swap" and not engine.background_decode
    notes = [e.message for e in events if isinstance(e, Stage) and "Out of GPU memory" in e.message]
    assert notes == ["Out of GPU memory in section 2/2: switched to swap placement; decoding each section before "
                     "sampling the next, retrying the section"]


def test_oom_while_encoding_the_prompt_steps_down_and_retries(tiny_root, tmp_path, test_image):
    bundle = load_models(tiny_spec("tiny", tiny_root))
    engine = Engine(bundle, Placement(torch.device("cpu"), "full", probe=lambda: (1 << 40, 0)), outputs_dir=tmp_path)
    calls = {}
    oom_once(bundle.text_encoder, calls)
    events = []
    final = engine.generate(_request(test_image, seconds=1.0), events.append)
    assert isinstance(final, Finished) and calls["n"] == 2
    assert [e.message for e in events if isinstance(e, Stage) and "Out of GPU memory" in e.message] == [
        "Out of GPU memory while encoding the prompt: switched to swap placement, retrying"]
    assert engine.placement.policy == "swap"
