"""Who may use a shared server: sign-in credentials from the settings, and a loud warning when the app is
reachable beyond this machine without them."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from ..config import SettingsError

LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def inside(path, folder) -> Path | None:
    """`path` resolved (links followed) if it lies inside `folder`, else None: the one check behind "the server
    opens only uploads" and "the gallery serves only outputs"."""
    try:
        resolved = Path(path).resolve()
        resolved.relative_to(Path(folder).resolve())
    except (TypeError, ValueError, OSError):
        return None
    return resolved


def credentials(auth: str, auth_file: str = "") -> list[tuple[str, str]]:
    """user:password pairs from FRAMEPACK_AUTH (comma-separated) and FRAMEPACK_AUTH_FILE (one a line; # comments)."""
    entries = [("FRAMEPACK_AUTH", part) for part in auth.split(",") if part.strip()]
    if auth_file:
        try:
            lines = Path(auth_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            raise SettingsError(f"FRAMEPACK_AUTH_FILE: cannot read {Path(auth_file).name}") from None
        entries += [(Path(auth_file).name, line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    pairs = []
    for where, entry in entries:
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise SettingsError(f"{where}: expected user:password, got an entry without both")  # no secret echoed
        pairs.append((user, password))
    return pairs


def exposure_warning(server: str, share: bool, signed_in: bool) -> str | None:
    """A warning when anyone on the network (or, with --share, the internet) can use the app without signing in."""
    if signed_in:
        return None
    if share:
        return ("--share makes a public link: anyone with it can run jobs, cancel them and download every video. "
                "Set FRAMEPACK_AUTH=user:password (or --auth-file) first.")
    try:
        local = server in LOOPBACK or ipaddress.ip_address(server).is_loopback
    except ValueError:
        local = False
    if not local:
        return (f"Listening on {server}: anyone who can reach this machine can run jobs, cancel them and download "
                "every video. Set FRAMEPACK_AUTH=user:password (or --auth-file) or bind to 127.0.0.1.")
    return None
