"""What every delivery method looks like to the worker.

A transport gets one message and the recipients that share a next hop, and answers one
Outcome per recipient, in order. One instance lives in each worker for the worker's life, so a
transport may keep state between messages (the SMTP transport keeps connections open).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from policy.next_hop import NextHop
from router.queue_file import QueueFile, Recipient

SENT, DEFERRED, BOUNCED = "sent", "deferred", "bounced"


@dataclass(frozen=True)
class Outcome:
    status: str  # sent, deferred or bounced, as Postfix logs them
    dsn: str  # enhanced status code, e.g. 2.0.0
    reply: str  # the next hop's words, or ours
    relay: str  # where it went: host[ip]:port, maildir[/path], none

    @classmethod
    def same_for(cls, recipients: list[Recipient], status: str, dsn: str, reply: str,
                 relay: str) -> list[Outcome]:
        return [cls(status, dsn, reply, relay)] * len(recipients)


class Transport(Protocol):
    def deliver(self, message: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        """Deliver to `recipients`; never raise for a delivery problem, answer it."""

    def close_idle(self) -> None:
        """Called when the worker is idle: let go of what has been held open too long."""

    def close(self) -> None:
        """Called when the worker exits: let go of everything, politely (SMTP QUIT)."""
