"""The registry of queue transports: `queue/NAME` is the transport registered as NAME in the
Python entry point group `qrouter.transports`, whose value is the transport's factory (see
docs/transports.md). qrouter's own (maildir, discard, error, retry) are registered there too, in
pyproject.toml, and a separately installed package adds its own the same way.

This module reads the names and loads one entry point when asked; it imports nothing of
qrouter's workers, so the policy may use it. The policy checks the built-ins' arguments itself
(policy/next_hop.py) and loads only another package's factory, to call its `check`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

GROUP = "qrouter.transports"
DISTRIBUTION = "qpsmtpd-router"  # ours: for a name registered twice, our entry point wins

_cache: tuple[tuple[int | None, ...], dict[str, EntryPoint]] | None = None


def installed() -> dict[str, EntryPoint]:
    """NAME -> entry point of every installed queue transport. Reading them all costs about a
    millisecond, too much for each line of a long transports file, so they are read again only
    when a directory on sys.path has changed (a package was installed or removed)."""
    global _cache
    state = tuple(_mtime(path) for path in sys.path)
    cached = _cache
    if cached is None or cached[0] != state:
        found = sorted(entry_points(group=GROUP), key=_ours)  # stable: ours last, so they win
        cached = _cache = (state, {point.name: point for point in found})
    return cached[1]


def load(name: str) -> Callable | None:
    """The factory registered as NAME, its module imported; None when none is installed.
    Raises whatever importing the module raises."""
    point = installed().get(name)
    return None if point is None else point.load()


def _ours(point: EntryPoint) -> bool:
    return point.dist is not None and point.dist.name == DISTRIBUTION


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path or ".").st_mtime_ns
    except OSError:
        return None
