"""Credentials for SMTP AUTH to relay hosts: the `relay-auth` file, `host user password` a line.

The file is refused when group or others may read it, as ssh refuses a readable private key: a
password file that anyone on the machine can read is a leak waiting to be noticed.
"""

from __future__ import annotations

import os
import stat


class RelayAuthError(ValueError):
    pass


def load_relay_auth(path: str) -> dict[str, tuple[str, str]]:
    """Map relay host (as written in `relayhost`, lower case) to (user, password)."""
    try:
        info = os.stat(path)
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RelayAuthError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RelayAuthError(f"{path}: readable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
                             "make it 0600")
    credentials: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) != 3:
            raise RelayAuthError(f"{path}:{number}: expected 'host user password'")
        host, user, password = parts
        credentials[host.lower()] = (user, password.strip())
    return credentials
