"""queue/upper DIR: write each message's body, upper-cased, into a file in DIR.

An example of a qrouter transport (docs/transports.md): registered as `upper` in the entry point
group `qrouter.transports`, whose value is `factory`.
"""

from __future__ import annotations

import itertools
import os

from workers.transport import DEFERRED, SENT, NoOpClose, Outcome


def check(argument: str) -> None:
    """Called when qrouter loads its policy: refuse what can never work."""
    if not os.path.isabs(argument):
        raise ValueError(f"needs an absolute directory, not {argument!r}")


class UpperTransport(NoOpClose):  # nothing held open: close_idle() and close() do nothing
    def __init__(self, config: object) -> None:
        self.counter = itertools.count(1)  # next() on it is safe from many threads at once

    def deliver(self, message, recipients, hop):
        directory = hop.argument
        relay = f"upper[{directory}]"
        name = f"{message.queue_id}.{os.getpid()}.{next(self.counter)}"
        try:
            staged = os.path.join(directory, f".{name}")
            with open(staged, "xb") as handle:
                handle.write(_body(message.message).upper())
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(staged, os.path.join(directory, name))
        except OSError as exc:  # a delivery problem is an answer, never an exception
            return Outcome.same_for(recipients, DEFERRED, "4.3.0",
                                    f"cannot write {directory}: {exc.strerror or exc}", relay)
        return Outcome.same_for(recipients, SENT, "2.0.0", f"written as {name}", relay)


def factory(config: object) -> UpperTransport:
    """Called once in each qrouter worker, with the daemon's Config."""
    return UpperTransport(config)


factory.check = check


def _body(data: bytes) -> bytes:
    """What follows the first empty line (the header's end)."""
    ends = [(at, len(mark)) for mark in (b"\r\n\r\n", b"\n\n") if (at := data.find(mark)) >= 0]
    if not ends:
        return b""
    at, length = min(ends)
    return data[at + length:]
