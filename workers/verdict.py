"""Transports that deliver nothing and only give a verdict: queue/discard, queue/error and
queue/retry. Registered as `discard`, `error` and `retry` in
the entry point group qrouter.transports (pyproject.toml)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from policy.next_hop import DISCARD, ERROR, NextHop
from router.spool.queue_file import QueueFile, Recipient
from workers.transport import BOUNCED, DEFERRED, SENT, NoOpClose, Outcome

if TYPE_CHECKING:
    from router.config import Config


class VerdictTransport(NoOpClose):
    def __init__(self, config: Config | None = None) -> None:
        pass  # it needs nothing from the config

    def deliver(self, message: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        if hop.kind == DISCARD:
            return Outcome.same_for(recipients, SENT, "2.0.0", "discarded", "none")
        dsn, text = hop.verdict()  # queue/error or queue/retry
        status = BOUNCED if hop.kind == ERROR else DEFERRED
        return Outcome.same_for(recipients, status, dsn, text, "none")
