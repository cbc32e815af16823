"""The settings for people: `--explain` (effective values and their sources) and the docs table.

    python -m diffusers_helper.settings --explain [--config PATH] [flags...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .load import (LoadedSettings, _default_of, _type_name, accepted, build_parser, load_settings,
                   setting_fields)
from .schema import ACTIVE, NOT_OFFERED, SettingsError


def explain(loaded: LoadedSettings, all_settings: bool = False) -> str:
    """The effective settings and where each came from; by default only the ones not at default."""
    rows = []
    for f in setting_fields():
        src = loaded.sources[f.name]
        if not all_settings and src.kind == "default":
            continue
        value = getattr(loaded.settings, f.name)
        status = f.metadata["status"]
        rows.append((f.name, repr(value), str(src), "" if status == ACTIVE else status))
    if not rows:
        return "All settings are at their defaults (use --all to list them)."
    widths = [max(len(r[i]) for r in rows + [("setting", "value", "source", "status")]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("setting", "value", "source", "status"), widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


DOCS_START, DOCS_END = "<!-- settings-table:start -->\n", "<!-- settings-table:end -->"


def docs_table() -> str:
    """Markdown for docs/settings.md, generated from the same metadata (a test keeps them in sync)."""
    out = []
    group = None
    for f in setting_fields():
        m = f.metadata
        if m["group"] != group:
            group = m["group"]
            out += ["", f"## {group}", "", "| variable | flags | type | default | accepted | effect | status |",
                    "|---|---|---|---|---|---|---|"]
        flags = " ".join(list(m["flags"]) + list(m["negative_flags"])) or "-"
        status = m["status"] if m["status"] == ACTIVE else f"{m['status']}: {m['note']}"
        default = _default_of(f)
        default = ",".join(default) if isinstance(default, list) else default
        out.append(f"| `{m['env']}` | {flags} | {_type_name(f)} | `{default!s}` | {accepted(f)} | {m['help']} "
                   f"| {status} |")
    out += ["", "## not offered", "", "Recognised so that a value set for them is reported as having no effect, "
            "never silently ignored.", "", "| variable | flags | why not |", "|---|---|---|"]
    out += [f"| `{n.env}` | {' '.join(n.flags) or '-'} | {n.reason} |" for n in NOT_OFFERED]
    return "\n".join(out).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m diffusers_helper.settings", parents=[build_parser(add_help=False)],
                                description="Show the effective FramePack settings and where each came from.")
    p.add_argument("--explain", action="store_true", help="print the effective settings and their sources")
    p.add_argument("--all", action="store_true", help="with --explain: list settings at their defaults too")
    p.add_argument("--docs", action="store_true", help="print the settings reference as Markdown")
    p.add_argument("--write-docs", metavar="PATH", help="replace the reference table in PATH (docs/settings.md)")
    ns, _ = p.parse_known_args(argv)
    if ns.docs:
        print(docs_table(), end="")
        return 0
    if ns.write_docs:
        path = Path(ns.write_docs)
        head, rest_text = path.read_text().split(DOCS_START, 1)
        tail = rest_text.split(DOCS_END, 1)[1]
        path.write_text(f"{head}{DOCS_START}{docs_table()}{DOCS_END}{tail}")
        return 0
    rest = [a for a in argv if a not in ("--explain", "--all", "--docs")]
    try:
        loaded = load_settings(rest)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for w in loaded.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(explain(loaded, all_settings=ns.all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
