"""Timed prompts: a prompt that changes over the video, and which prompt each section uses.

    [0s: a cat sits on a sofa] [2s: the cat stands up] [4.5s: the cat jumps down]

One part per line or all on one line, as FramePack-Studio writes them (so its prompts paste as they are); a range
`[1s-3s: ...]` starts at its first time. Text before the first part runs from 0 s. A prompt without a part like
these is a plain prompt and takes the original's path unchanged (brackets such as "[cinematic]" stay text).

Each section uses the part in effect at its middle; with blending, a new part fades in over the next N sections
(weights 1/(N+1) ... N/(N+1)), so the change happens gradually instead of at one section boundary.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger("framepack.prompts")

_NUMBER = r"\d+(?:\.\d+)?"
_LABEL = re.compile(rf"^({_NUMBER})\s*s?(?:\s*-\s*({_NUMBER})\s*s?)?$", re.IGNORECASE)
_OPEN = re.compile(r"\[([^\[\]:\n]{0,40}):")  # "[label:" with a short label: a timed part, or an attempt at one


class PromptSyntaxError(ValueError):
    """A malformed timed prompt; the message points at the part (character position and text)."""


@dataclass(frozen=True)
class TimedPart:
    start_s: float
    text: str


def _snippet(text: str, at: int) -> str:
    piece = text[at:at + 24].replace("\n", " ")
    return piece + ("..." if len(text) > at + 24 else "")


def _bad(text: str, at: int, why: str) -> PromptSyntaxError:
    return PromptSyntaxError(f"timed prompt: {why} at character {at + 1} ('{_snippet(text, at)}'); write parts like "
                             "[0s: a cat sits] [2s: the cat stands up]")


def parse_timed_prompt(text: str) -> list[TimedPart]:
    """The parts of a prompt in time order; a plain prompt is one part at 0 s with the whole text."""
    opens = list(_OPEN.finditer(text))
    timed = [m for m in opens if _LABEL.match(m.group(1).strip())]
    attempts = [m for m in opens if m.group(1).strip()[:1].isdigit()]
    if not timed and not attempts:
        return [TimedPart(0.0, text)]
    parts: list[TimedPart] = []
    pos = 0
    lead = ""
    for m in opens:
        if m.start() < pos:
            continue  # a "[x:" inside an earlier part's text
        label = m.group(1).strip()
        match = _LABEL.match(label)
        if match is None:
            raise _bad(text, m.start(), f"'{label}' is not a time such as 2s or 1.5s")
        between = text[pos:m.start()].strip()
        if between:
            if parts:
                raise _bad(text, pos + text[pos:].index(between[0]), "text outside the [time: ...] parts")
            lead = between
        close = text.find("]", m.end())
        if close < 0:
            raise _bad(text, m.start(), "this part has no closing ]")
        start = float(match.group(1))
        if match.group(2) is not None and float(match.group(2)) <= start:
            raise _bad(text, m.start(), f"the range {label} ends before it starts")
        body = text[m.end():close].strip()
        if not body:
            raise _bad(text, m.start(), "this part has no text")
        if any(p.start_s == start for p in parts):
            raise _bad(text, m.start(), f"a second part starts at {start:g}s")
        parts.append(TimedPart(start, body))
        pos = close + 1
    rest = text[pos:].strip()
    if rest:
        raise _bad(text, pos + text[pos:].index(rest[0]), "text outside the [time: ...] parts")
    parts.sort(key=lambda p: p.start_s)
    if lead:
        if parts[0].start_s == 0:
            raise _bad(text, 0, "text before the first part, which already starts at 0s")
        parts.insert(0, TimedPart(0.0, lead))
    return parts


def is_timed(parts: list[TimedPart]) -> bool:
    return len(parts) > 1 or parts[0].start_s > 0


def section_weights(parts: list[TimedPart], sections: int, section_s: float, blend: int = 0) -> list[dict[str, float]]:
    """For each section in time order: {prompt text: weight}, weights summing to 1."""
    active = []
    for i in range(sections):
        middle = (i + 0.5) * section_s
        active.append(max((k for k, p in enumerate(parts) if p.start_s <= middle), default=0))
    out: list[dict[str, float]] = []
    for i, k in enumerate(active):
        weights = {parts[k].text: 1.0}
        if blend > 0:
            changed = next((j for j in range(i, max(-1, i - blend - 1), -1) if j > 0 and active[j] != active[j - 1]),
                           None)
            if changed is not None and i - changed < blend:
                w = (i - changed + 1) / (blend + 1)
                previous = parts[active[changed - 1]].text
                if previous != parts[k].text:
                    weights = {previous: 1.0 - w, parts[k].text: w}
        out.append(weights)
    return out


def describe(parts: list[TimedPart], weights: list[dict[str, float]], section_s: float) -> list[dict]:
    """The schedule as the sidecar records it and the log prints it: one entry per section in time order."""
    rows = []
    for i, mix in enumerate(weights):
        rows.append({"section": i + 1, "from_s": round(i * section_s, 3),
                     "prompts": [{"text": t, "weight": round(w, 4)} for t, w in mix.items()]})
    return rows


@dataclass
class JobPrompts:
    """A job's encoded prompts: one embedding per section in time order (one shared by all for a plain prompt)."""

    sections: list  # PromptEmbeds
    negative: object  # PromptEmbeds
    schedule: list[dict] | None = None  # what each section uses, for the sidecar (timed prompts only)


def encode_job_prompts(prompt: str, negative_prompt: str, cfg: float, sections: int, section_s: float, blend: int,
                       encode) -> JobPrompts:
    """Encode each distinct prompt the sections use once (`encode`: text -> PromptEmbeds) and mix the blends."""
    from .conditioning import PromptEmbeds

    parts = parse_timed_prompt(prompt)
    if not is_timed(parts):
        positive = encode(prompt)
        return JobPrompts([positive], positive.zeros_like() if cfg == 1.0 else encode(negative_prompt))
    weights = section_weights(parts, sections, section_s, blend)
    used = dict.fromkeys(text for mix in weights for text in mix)
    for part in parts:
        if part.text not in used:
            log.info("Timed prompt: the part at %gs is not used (the video ends at %gs)", part.start_s,
                     sections * section_s)
    encoded = {text: encode(text) for text in used}
    per_section = [PromptEmbeds.mix([(encoded[t], w) for t, w in mix.items()]) for mix in weights]
    schedule = describe(parts, weights, section_s)
    for row in schedule:
        log.info("Section %d (from %gs): %s", row["section"], row["from_s"],
                 " + ".join(f"{p['weight']:g} x '{p['text'][:40]}'" for p in row["prompts"]))
    negative = per_section[0].zeros_like() if cfg == 1.0 else encode(negative_prompt)
    return JobPrompts(per_section, negative, schedule)
