"""What the web page shows and reads, as plain functions (no gradio, no tensors), so they are easy to test:
status lines, the progress bar, the queue table, the LoRA picker's list, keyframe times.
"""

from __future__ import annotations

from .jobs import RUNNING, JobSnapshot
from ..pipeline.request import InputError


def keyframes_from(times: str, files) -> list[tuple[float, str]]:
    """Keyframe images paired with their times, in the order given: '1.2, 3.6' for two images."""
    files = [f for f in (files or []) if f]
    parts = [t.strip().removesuffix("s") for t in (times or "").replace(";", ",").split(",") if t.strip()]
    if len(parts) != len(files):
        raise InputError(f"give one time per keyframe image ({len(files)} image(s), {len(parts)} time(s))")
    try:
        return [(float(t), f) for t, f in zip(parts, files)]
    except ValueError:
        raise InputError(f"keyframe times are seconds such as 1.2, 3.6; got {times!r}") from None


def add_lora(current: str, name: str | None):
    """The picked LoRA joins the list at weight 1 (edit the number to change it); the picker clears."""
    items = [t.strip() for t in (current or "").split(",") if t.strip()]
    if name and not any(t.rpartition(":")[0] == name or t == name for t in items):
        items.append(f"{name}:1.0")
    return ", ".join(items), None


def progress_html(fraction: float, text: str) -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="fp-progress"><div class="fp-label">{text}</div>'
            f'<div class="fp-track"><div class="fp-bar" style="width:{pct:.1f}%"></div></div></div>')


def status_text(snap: JobSnapshot | None) -> str:
    if snap is None:
        return "Upload an image, write a prompt and press Start."
    if snap.state == RUNNING and snap.steps:
        eta = f", about {snap.eta_s:.0f} s left" if snap.eta_s is not None else ""
        return (f"**{snap.stage}**, step {snap.step}/{snap.steps} ({snap.fraction * 100:.0f}%{eta}) "
                f"- job `{snap.job_id}`")
    if snap.state == "failed":
        return f"**Failed:** {snap.error}"
    return f"**{snap.stage}** - job `{snap.job_id}`"


def queue_rows(jobs: list[JobSnapshot]) -> list[list]:
    """Newest first; 'worker' names the pool worker and its GPU ('w1, GPU 1'), empty for the in-process worker."""
    return [[j.job_id, j.state, j.model, (j.prompt[:40] + "...") if len(j.prompt) > 40 else j.prompt,
             f"{j.fraction * 100:.0f}%", ", ".join(p for p in (j.worker, j.gpu) if p)] for j in reversed(jobs)]
