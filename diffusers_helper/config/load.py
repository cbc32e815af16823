"""Reads the settings from their four sources, lowest to highest: defaults, a YAML config file
(`config.yaml` or `--config PATH`), `FRAMEPACK_*` environment variables, command-line flags. Every value,
whatever its source, goes through one validator.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .job import cache_threshold_field, python_type
from .schema import (ACTIVE, CONFIG_ALIASES, FALSE_WORDS, NOT_OFFERED, PLANNED, TRUE_WORDS, Settings,
                     SettingsError)

log = logging.getLogger("framepack.settings")
_NOT_OFFERED = {n.name: n for n in NOT_OFFERED}
_NOT_OFFERED_ENV = {n.env for n in NOT_OFFERED}


@dataclass(frozen=True)
class Source:
    kind: str  # default, config, env, cli
    where: str = ""

    def __str__(self) -> str:
        return self.kind if not self.where else f"{self.kind} ({self.where})"


@dataclass
class LoadedSettings:
    settings: Settings
    sources: dict[str, Source]
    warnings: list[str]

    def explicitly_set(self, name: str) -> bool:
        return self.sources[name].kind != "default"


def setting_fields():
    return [f for f in fields(Settings)]


def _type_name(f) -> str:
    kind = f.metadata["kind"]
    if kind == "csv":
        return "list (comma-separated)"
    if kind == "path":
        return "path"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list"}.get(python_type(f), str(f.type))


def accepted(f) -> str:
    m = f.metadata
    t = python_type(f)
    if m["choices"]:
        return ", ".join(str(c) for c in m["choices"])
    if t is bool:
        return "1/0, true/false, yes/no, on/off"
    if m["min"] is not None and m["max"] is not None:
        return f"{m['min']} to {m['max']}"
    if m["kind"] == "csv":
        return "comma-separated names"
    return "any text" if t is str else t.__name__


def parse_value(f, raw: Any, origin: str):
    """Convert and check one raw value (text from env/CLI, or YAML scalars)."""
    m = f.metadata
    t = python_type(f)

    def bad(reason: str = ""):
        extra = f" ({reason})" if reason else ""
        return SettingsError(f"{origin}={raw!r} is not valid{extra}; accepted: {accepted(f)}")

    if t is bool:
        if isinstance(raw, bool):
            value = raw
        else:
            word = str(raw).strip().lower()
            if word in TRUE_WORDS:
                value = True
            elif word in FALSE_WORDS:
                value = False
            else:
                raise bad()
    elif t is int:
        if isinstance(raw, bool):
            raise bad()
        try:
            value = int(str(raw).strip(), 10) if not isinstance(raw, int) else raw
        except ValueError:
            raise bad("not a whole number") from None
    elif t is float:
        if isinstance(raw, bool):
            raise bad()
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise bad("not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise bad("not a finite number")
    elif t is list:
        if isinstance(raw, (list, tuple)):
            value = [str(x).strip() for x in raw if str(x).strip()]
        else:
            value = [part.strip() for part in str(raw).split(",") if part.strip()]
    else:
        value = str(raw).strip() if raw is not None else ""
        if f.name == "log_level":
            value = value.upper()
    if m["choices"] and value not in m["choices"]:
        raise bad()
    if m["min"] is not None and value < m["min"]:
        raise bad(f"below {m['min']}")
    if m["max"] is not None and value > m["max"]:
        raise bad(f"above {m['max']}")
    return value


# older switches that now pick a step cache (variable, or its lower-case name in config.yaml): variable ->
# (field, value when on, value when off)
SHORTCUTS = {"FRAMEPACK_USE_TEACACHE": ("cache", "teacache", "none"),
             "FRAMEPACK_ENABLE_FBCACHE": ("cache", "fbcache", None)}  # off: leave the choice alone
SHORTCUT_FLAGS = {"--disable-fbcache": "FRAMEPACK_ENABLE_FBCACHE"}  # flags whose "on" form is a const flag


def _shortcut(var: str, raw: str) -> tuple[str, Any]:
    name, on, off = SHORTCUTS[var]
    text = str(raw).strip().lower() if not isinstance(raw, bool) else str(int(raw))
    if text not in TRUE_WORDS and text not in FALSE_WORDS:
        raise SettingsError(f"{var}={raw!r}: expected 1 or 0 (true/false)")
    return name, on if text in TRUE_WORDS else off


def _by_env() -> dict[str, Any]:
    return {f.metadata["env"]: f for f in setting_fields() if f.metadata["env"]}


def _flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """Accept flat keys or one level of grouping (`model: {enable_torch_compile: true}`)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_config(path: Path, by_name: dict, explicit: bool, warnings: list[str]) -> dict[str, tuple[Any, str]]:
    import yaml

    if not path.is_file():
        if explicit:
            raise SettingsError(f"config file not found: {path}")
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (UnicodeDecodeError, ValueError):  # a binary file (YAML refuses some control bytes with a ValueError)
        raise SettingsError(f"config file {path} is not a text file") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise SettingsError(f"config file {path} is not valid YAML: {first}") from None
    if not isinstance(data, Mapping):
        raise SettingsError(f"config file {path} must be a mapping of setting names to values")
    values = {}
    for dotted, value in _flatten(data).items():
        key = dotted.rsplit(".", 1)[-1]
        name = CONFIG_ALIASES.get(key, key)
        shortcut = SHORTCUTS.get(f"FRAMEPACK_{key.upper()}")
        if shortcut is not None:  # use_teacache: false -> cache: none
            _, value = _shortcut(f"FRAMEPACK_{key.upper()}", value)
            if value is None:
                continue
            name = shortcut[0]
        if name in _NOT_OFFERED:
            values[name] = (value, f"{path}:{dotted}")  # reported by load_settings as having no effect
            continue
        if name not in by_name:
            near = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise SettingsError(f"config file {path}: unknown setting {dotted!r}{hint}")
        if name in values:
            warnings.append(f"config file {path}: {name} is set twice ({values[name][1].rsplit(':', 1)[-1]} and "
                            f"{dotted}); the last one, {dotted}, is used")
        values[name] = (value, f"{path}:{dotted}")
    return values


def build_parser(add_help: bool = True, prog: str | None = None, description: str | None = None
                 ) -> argparse.ArgumentParser:
    """Flags for every setting that has one; values stay strings so one validator checks all sources."""
    p = argparse.ArgumentParser(prog=prog, add_help=add_help, argument_default=argparse.SUPPRESS,
                                description=description)
    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML settings file (default: ./config.yaml)")
    for f in setting_fields():
        m = f.metadata
        if not m["flags"] and not m["negative_flags"]:
            continue
        help_text = m["help"] + ("" if m["status"] == ACTIVE else f" [{m['status']}]")
        if python_type(f) is bool:
            if m["flags"]:
                p.add_argument(*m["flags"], dest=f.name, action="store_const", const="1", help=help_text)
            if m["negative_flags"]:
                p.add_argument(*m["negative_flags"], dest=f.name, action="store_const", const="0",
                               help=f"turn off: {m['help']}")
        else:
            p.add_argument(*m["flags"], dest=f.name, metavar=f.name.upper(), help=help_text)
        for flag, value in m.get("const_flags", {}).items():
            p.add_argument(flag, dest=f.name, action="store_const", const=value, help=f"same as {m['flags'][0]} {value}")
    for flag, var in SHORTCUT_FLAGS.items():
        p.add_argument(flag, dest=f"shortcut:{var}", action="store_const", const="0", help=argparse.SUPPRESS)
    p.add_argument("--cache-threshold", dest="cache_threshold", metavar="X",
                   help="the chosen step cache's threshold (TaylorSeer: its interval)")
    for n in NOT_OFFERED:  # recognised so that a value is reported as having no effect, never silently dropped
        if n.flags:
            kwargs = dict(metavar="VALUE") if n.takes_value else dict(action="store_const", const="1")
            p.add_argument(*n.flags, dest=f"not_offered:{n.name}", help=argparse.SUPPRESS, **kwargs)
    return p


def load_settings(argv: list[str] | None = None, env: Mapping[str, str] | None = None,
                  config_path: str | Path | None = None, cwd: Path | None = None) -> LoadedSettings:
    """Defaults < config file < FRAMEPACK_* env < CLI flags. Raises SettingsError on any bad value."""
    env = os.environ if env is None else env
    by_name = {f.name: f for f in setting_fields()}
    args = vars(build_parser(add_help=False).parse_known_args(argv or [])[0]) if argv is not None else {}
    explicit_config = "config" in args or config_path is not None
    cfg_path = Path(args.pop("config", None) or config_path or (cwd or Path.cwd()) / "config.yaml")

    values = {name: _default_of(f) for name, f in by_name.items()}
    sources = {name: Source("default") for name in by_name}
    warnings: list[str] = []

    ignored: list[tuple[str, str, object]] = []  # (name, where, value) of settings not offered here
    for name, (raw, where) in _read_config(cfg_path, by_name, explicit_config, warnings).items():
        if name in _NOT_OFFERED:
            ignored.append((name, where, raw))
            continue
        values[name] = parse_value(by_name[name], raw, where)
        sources[name] = Source("config", where)
    for n in NOT_OFFERED:
        if n.env in env:
            ignored.append((n.name, n.env, env[n.env]))
        if f"not_offered:{n.name}" in args:
            ignored.append((n.name, n.flags[0], args.pop(f"not_offered:{n.name}")))

    env_fields = _by_env()
    threshold = None  # FRAMEPACK_CACHE_THRESHOLD / --cache-threshold: applied once the cache is known
    for var, raw in env.items():
        if not var.startswith("FRAMEPACK_") or var in _NOT_OFFERED_ENV:
            continue
        if var in SHORTCUTS:
            name, value = _shortcut(var, raw)
            if value is not None:
                values[name], sources[name] = value, Source("env", var)
            continue
        if var == "FRAMEPACK_CACHE_THRESHOLD":
            threshold = (raw, var)
            continue
        f = env_fields.get(var)
        if f is None:
            # compare what follows the shared prefix, or every name looks alike
            suffixes = {name[len("FRAMEPACK_"):]: name for name in env_fields}
            near = difflib.get_close_matches(var[len("FRAMEPACK_"):], list(suffixes), n=1, cutoff=0.7)
            hint = f"; did you mean {suffixes[near[0]]}?" if near else ""
            warnings.append(f"unknown environment variable {var}{hint}")
            continue
        values[f.name] = parse_value(f, raw, var)
        sources[f.name] = Source("env", var)

    for var in SHORTCUT_FLAGS.values():
        if args.pop(f"shortcut:{var}", None) is not None and values[SHORTCUTS[var][0]] == SHORTCUTS[var][1]:
            name = SHORTCUTS[var][0]  # --disable-fbcache after FRAMEPACK_ENABLE_FBCACHE=1: back to the default
            values[name], sources[name] = _default_of(by_name[name]), Source("default")
    if "cache_threshold" in args:
        threshold = (args.pop("cache_threshold"), "--cache-threshold")
    for name, raw in args.items():
        f = by_name[name]
        flag = (f.metadata["flags"] or f.metadata["negative_flags"])[0]
        values[name] = parse_value(f, raw, flag)
        sources[name] = Source("cli", flag)
    if threshold is not None:
        target = cache_threshold_field(values["cache"])
        if target is None:
            warnings.append(f"{threshold[1]}: no step cache is chosen; the value {threshold[0]!r} has no effect")
        else:
            values[target] = parse_value(by_name[target], threshold[0], threshold[1])
            sources[target] = Source("env" if threshold[1].startswith("FRAMEPACK_") else "cli", threshold[1])

    settings = Settings(**values)
    loaded = LoadedSettings(settings, sources, warnings)
    for name, f in by_name.items():
        m = f.metadata
        if m["status"] != ACTIVE and loaded.explicitly_set(name) and values[name] != _default_of(f):
            label = m["env"] or name
            what = "not available in this version" if m["status"] == PLANNED else "not offered"
            warnings.append(f"{label}: {what} ({m['note']}); the value {values[name]!r} has no effect")
    for name, where, raw in ignored:
        warnings.append(f"{where}: not offered ({_NOT_OFFERED[name].reason}); the value {raw!r} has no effect")
    for var in ("PYTORCH_ENABLE_FLASH_SDP", "PYTORCH_ENABLE_MEM_EFFICIENT_SDP"):
        if var in env:
            torch_sdp_flag(env, var)  # a bad value stops start-up like any other
    return loaded


def torch_sdp_flag(env: Mapping[str, str], var: str) -> bool | None:
    """PyTorch's PYTORCH_ENABLE_*_SDP switches: None when unset, else the boolean."""
    if var not in env:
        return None
    word = env[var].strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingsError(f"{var}={env[var]!r} is not valid; accepted: 1/0, true/false, yes/no, on/off")


def _default_of(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


