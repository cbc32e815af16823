"""Timed prompts: the syntax, which prompt each section uses, and the engine encoding each prompt once."""

import json
from pathlib import Path

import pytest
import torch

from diffusers_helper.pipeline import engine as engine_module
from diffusers_helper.pipeline.engine import Engine
from diffusers_helper.pipeline.events import Failed, Finished
from diffusers_helper.pipeline.prompts import (PromptSyntaxError, TimedPart, is_timed, parse_timed_prompt,
                                               section_weights)
from diffusers_helper.pipeline.request import GenerationRequest


@pytest.mark.parametrize("text", ["a cat walks", "a cat [cinematic] walks", "style: anime, a cat", "[style: anime] cat",
                                  "a cat at 10:30 [sunny]", ""])
def test_plain_prompts_stay_plain(text):
    parts = parse_timed_prompt(text)
    assert parts == [TimedPart(0.0, text)] and not is_timed(parts)


@pytest.mark.parametrize("text", [
    "[0s: a cat sits] [2s: the cat stands up] [4.5s: the cat jumps]",
    "[0s: a cat sits]\n[2s: the cat stands up]\n[4.5s: the cat jumps]\n",
    "[4.5s: the cat jumps] [0s: a cat sits] [2s: the cat stands up]",  # any order
    "[0s-2s: a cat sits] [2s - 4.5s: the cat stands up] [4.5S:the cat jumps]",  # ranges, spaces, capital S
    "[0: a cat sits] [2: the cat stands up] [4.5: the cat jumps]",  # seconds without the s
])
def test_timed_prompt_syntax(text):
    assert parse_timed_prompt(text) == [TimedPart(0.0, "a cat sits"), TimedPart(2.0, "the cat stands up"),
                                        TimedPart(4.5, "the cat jumps")]


def test_text_before_the_first_part_runs_from_zero():
    assert parse_timed_prompt("a cat sits [3s: it yawns]") == [TimedPart(0.0, "a cat sits"), TimedPart(3.0, "it yawns")]


@pytest.mark.parametrize("text, why, at", [
    ("[0s: a cat] [2x: it stands]", "'2x' is not a time", 13),
    ("[0s: a cat] [2 sec: it stands]", "'2 sec' is not a time", 13),
    ("[0s: a cat] [2s: it stands", "no closing ]", 13),
    ("[0s: a cat] [0s: a dog]", "a second part starts at 0s", 13),
    ("[0s: a cat] and a dog [2s: it stands]", "text outside", 13),
    ("[0s: a cat] [2s: it stands] the end", "text outside", 29),
    ("[3s-1s: a cat]", "ends before it starts", 1),
    ("[0s: ] [2s: it stands]", "has no text", 1),
    ("hello [0s: a cat]", "already starts at 0s", 1),
    ("[0s: a cat] [style: anime]", "'style' is not a time", 13),
])
def test_malformed_timed_prompts_point_at_the_part(text, why, at):
    with pytest.raises(PromptSyntaxError) as info:
        parse_timed_prompt(text)
    message = str(info.value)
    assert why in message and f"at character {at} " in message and "\n" not in message, message


def test_each_section_uses_the_part_in_effect_at_its_middle():
    parts = parse_timed_prompt("[0s: a] [2s: b] [4.5s: c]")
    # 5 sections of 1.2 s: middles at 0.6, 1.8, 3.0, 4.2, 5.4
    assert section_weights(parts, 5, 1.2) == [{"a": 1.0}, {"a": 1.0}, {"b": 1.0}, {"b": 1.0}, {"c": 1.0}]
    blended = section_weights(parts, 5, 1.2, blend=1)
    assert blended == [{"a": 1.0}, {"a": 1.0}, {"a": 0.5, "b": 0.5}, {"b": 1.0}, {"b": 0.5, "c": 0.5}]
    two = section_weights(parse_timed_prompt("[0s: a] [1s: b]"), 4, 1.2, blend=2)
    assert two[0] == {"a": 1.0}
    assert two[1] == pytest.approx({"a": 2 / 3, "b": 1 / 3}) and two[2] == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    assert two[3] == {"b": 1.0}
    assert section_weights(parse_timed_prompt("[1s: a] [3s: b]"), 3, 1.2)[0] == {"a": 1.0}  # the first part from 0 s


def test_a_bad_timestamp_fails_the_job_in_one_line(tiny_bundles, tmp_path, test_image):
    engine = Engine(tiny_bundles["tiny"], outputs_dir=tmp_path)
    final = engine.generate(GenerationRequest(prompt="[0s: a cat] [2x: it stands]", image=test_image, seed=1,
                                              seconds=1.0, steps=2), lambda e: None)
    assert isinstance(final, Failed) and "'2x' is not a time" in final.error and final.video_path is None


def _run(engine, prompt, test_image, **kw):
    final = engine.generate(GenerationRequest(prompt=prompt, image=test_image, seed=7, seconds=2.4, steps=3,
                                              cache="none", **kw), lambda e: None)
    assert isinstance(final, Finished), final
    return final


def test_timed_prompt_job_encodes_each_prompt_once(tiny_bundles, tmp_path, test_image, monkeypatch):
    bundle = tiny_bundles["tiny"]
    engine = Engine(bundle, outputs_dir=tmp_path)
    decoded = []
    decode = engine.decoder.decode
    engine.decoder.decode = lambda z, *a, **k: (decoded.append(z.clone()), decode(z, *a, **k))[1]
    encoded = []
    real = engine_module.encode_prompt
    monkeypatch.setattr(engine_module, "encode_prompt", lambda text, *a: (encoded.append(text), real(text, *a))[1])

    plain = _run(engine, "a cat sits", test_image)
    plain_latents, decoded[:] = list(decoded), []
    same = _run(engine, "[0s: a cat sits] [1.2s: a cat sits]", test_image)  # two parts, one distinct prompt
    assert all(torch.equal(a, b) for a, b in zip(plain_latents, decoded))
    decoded[:] = []
    encoded[:] = []
    timed = _run(engine, "[0s: a cat sits]\n[1.2s: a dog runs]\n[9s: never used]", test_image,
                 prompt_blend_sections=1)
    assert sorted(encoded) == ["a cat sits", "a dog runs"]  # once each; the part after the video's end is not used
    assert not torch.equal(plain_latents[0], decoded[0])
    record = json.loads(Path(timed.sidecar_path).read_text())
    assert record["settings"]["prompt_blend_sections"] == 1
    assert [[p["text"] for p in row["prompts"]] for row in record["prompt_schedule"]] == [
        ["a cat sits"], ["a cat sits", "a dog runs"]]  # 2 sections of 1.2 s; the second blends in over 1
    assert "prompt_schedule" not in json.loads(Path(plain.sidecar_path).read_text())
    assert "prompt_schedule" in json.loads(Path(same.sidecar_path).read_text())


def test_sections_map_to_their_time_in_both_modes():
    from diffusers_helper.pipeline.sections import SectionSchedule

    start = torch.zeros(1, 16, 1, 4, 4)
    assert [SectionSchedule("inverted", start, 3, 9).time_index(k) for k in range(3)] == [2, 1, 0]
    assert [SectionSchedule("f1", start, 3, 9).time_index(k) for k in range(3)] == [0, 1, 2]
