"""Queue ids: unique across processes, ordered by arrival time, safe as file names.

Form: 13 upper-case hex digits of microseconds since the epoch, the writer's pid, a per-process
counter, e.g. `0643A8B2C1D4E-1A2B-1`. Sorting ids sorts by arrival, so the oldest message in a
queue directory is known from its file names alone. A Perl writer makes the same with
`sprintf("%013X-%X-%X", $usec, $$, ++$counter)`.
"""

from __future__ import annotations

import itertools
import os
import re
import time

_counter = itertools.count(1)
_VALID = re.compile(r"[0-9A-F]{13}-[0-9A-F]+-[0-9A-F]+")


def new_queue_id() -> str:
    return f"{time.time_ns() // 1000:013X}-{os.getpid():X}-{next(_counter):X}"


def is_queue_id(name: str) -> bool:
    """True for names a writer could have made; anything else in a queue directory is foreign."""
    return bool(_VALID.fullmatch(name))


def arrival_of(queue_id: str) -> float:
    """The arrival time encoded in an id (seconds since the epoch)."""
    return int(queue_id[:13], 16) / 1e6
