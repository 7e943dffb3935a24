"""What every delivery method looks like to the worker, and the interface of `queue/NAME`
transports, qrouter's own and those of other packages (docs/transports.md).

A transport gets one message and the recipients that share a next hop, and answers one
Outcome per recipient, in order. One instance lives in each worker for the worker's life, so a
transport may keep state between messages (the SMTP transport keeps connections open); the
worker's session threads share it, so it must be thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from policy import transport_registry
from policy.next_hop import BUILTIN_QUEUE, NextHop, queue_kind, queue_name
from router.spool.queue_file import QueueFile, Recipient

if TYPE_CHECKING:
    from router.config import Config

log = logging.getLogger("qrouter")

SENT, DEFERRED, BOUNCED = "sent", "deferred", "bounced"


@dataclass(frozen=True)
class Outcome:
    status: str  # sent, deferred or bounced, as Postfix logs them
    dsn: str  # enhanced status code, e.g. 2.0.0
    reply: str  # the next hop's words, or ours
    relay: str  # where it went: host[ip]:port, maildir[/path], none
    dsn_passed: bool = False  # the DSN request went on with the message: the next hop reports success
    # Seconds of the delivery spent setting up the connection (DNS, connect, greeting, EHLO, TLS,
    # AUTH), Postfix's delays c; the rest of the transport's time is transmission (d).
    setup: float = 0.0

    @classmethod
    def same_for(cls, recipients: list[Recipient], status: str, dsn: str, reply: str,
                 relay: str, setup: float = 0.0) -> list[Outcome]:
        return [cls(status, dsn, reply, relay, setup=setup)] * len(recipients)


class Transport(Protocol):
    def deliver(self, message: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        """Deliver to `recipients`; never raise for a delivery problem, answer it."""

    def close_idle(self) -> None:
        """Called when the worker is idle: let go of what has been held open too long."""

    def close(self) -> None:
        """Called when the worker exits: let go of everything, politely (SMTP QUIT)."""


class TransportFactory(Protocol):
    """What an entry point of the group `qrouter.transports` names: called once in each worker,
    with the daemon's config, the first time the worker needs the transport. It may have a
    `check(argument: str) -> None` attribute that raises ValueError for an argument it cannot
    use; the policy calls it when it loads, so the error names the file and line."""

    def __call__(self, config: Config) -> Transport: ...


class NoOpClose:
    """close_idle() and close() for a transport that holds nothing open."""

    def close_idle(self) -> None:
        pass

    def close(self) -> None:
        pass


class Unavailable(NoOpClose):
    """A transport that cannot deliver now: every recipient is deferred (4.3.0) with the reason,
    so the mail waits in deferred/ until the transport is installed or fixed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def deliver(self, message: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        return Outcome.same_for(recipients, DEFERRED, "4.3.0", self.reason, "none")


class Transports(dict[str, Transport]):
    """A worker's transports by NextHop kind. A `queue/NAME` transport comes from the registry:
    its factory is called the first time a message goes there (the built-ins at once), and the
    instance kept, one a name. One not installed, or whose factory fails, is not kept: its mail
    is deferred, and it is looked up again for the next message."""

    def __init__(self, config: Config, others: Mapping[str, Transport]) -> None:
        super().__init__(others)
        self.config = config
        self.lock = threading.Lock()  # for changes to the dict, held only for an instant
        self.starting = threading.Lock()  # held while a factory runs: one instance a name
        for name in BUILTIN_QUEUE:  # started at once, the same way as any other
            self.__missing__(queue_kind(name))

    def __missing__(self, kind: str) -> Transport:
        name = queue_name(kind)
        if name is None:
            raise KeyError(kind)
        with self.starting:
            if kind in self:  # another session thread started it meanwhile
                return dict.__getitem__(self, kind)
            try:
                factory = transport_registry.load(name)
                if factory is None:
                    return Unavailable(f"transport queue/{name} is not installed")
                transport = factory(self.config)
            except Exception as exc:
                log.exception("transport queue/%s cannot be started", name)
                return Unavailable(f"transport queue/{name} cannot be started: {type(exc).__name__}: {exc}")
            with self.lock:
                self[kind] = transport
            return transport

    def values(self) -> list[Transport]:  # type: ignore[override]
        """A copy: the worker's main thread goes through them while sessions may add one."""
        with self.lock:
            return list(dict.values(self))
