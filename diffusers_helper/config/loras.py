"""A job's LoRA list as text: `style.safetensors:0.8, detail:0.5`, and which files it may name.

Kept free of torch so the CLI and the web app can check a job (and print --help) without loading anything; the
LoRAs themselves are applied by `accel.lora`.
"""

from __future__ import annotations

import re
from pathlib import Path

SUFFIXES = (".safetensors",)


class LoraError(ValueError):
    """A LoRA that cannot be used with this model; one line naming the file."""


def available_loras(folder: str | Path) -> list[str]:
    """The LoRA files a client may choose: names in the LoRA folder, never paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def parse_lora_list(text: str) -> list[tuple[str, float]]:
    """'a.safetensors:0.8, b.safetensors' -> [(name, weight), ...]; weight 1 when left out."""
    out = []
    for item in [t.strip() for t in re.split(r"[,\n]", text or "") if t.strip()]:
        name, sep, weight = item.rpartition(":")
        if not sep or not re.fullmatch(r"-?\d+(\.\d+)?", weight.strip()):
            name, weight = item, "1"
        value = float(weight)
        if not -4.0 <= value <= 4.0:
            raise LoraError(f"LoRA weight must be between -4 and 4, got {value:g} for {name.strip()}")
        out.append((name.strip(), value))
    return out


def names_only(text: str) -> None:
    """For clients of the web app and its API: LoRAs are chosen by name from the LoRA folder, never by path."""
    for name, _ in parse_lora_list(text):
        if Path(name).name != name or name.startswith(".") or "\\" in name:
            raise LoraError(f"LoRA {name!r}: give the file name of a LoRA in the LoRA folder, not a path")


def resolve_loras(text: str, folder: str | Path) -> list[tuple[str, float]]:
    """Names to files in the LoRA folder; an absolute path (the CLI's --lora) is taken as it is. The web app checks
    `names_only` first, so its clients never name a path."""
    folder = Path(folder)
    out = []
    for name, weight in parse_lora_list(text):
        if Path(name).is_absolute():
            out.append((name, weight))
            continue
        if Path(name).name != name or name.startswith("."):
            raise LoraError(f"LoRA {name!r}: give the file name of a LoRA in the LoRA folder")
        if not name.lower().endswith(SUFFIXES):
            name += ".safetensors"
        path = folder / name
        if not path.is_file():
            raise LoraError(f"LoRA {name} is not in the LoRA folder ({len(available_loras(folder))} files there)")
        out.append((str(path), weight))
    return out
