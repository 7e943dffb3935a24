"""The lines Postfix's log readers count (pflogsumm, logwatch, postfix_exporter), written as
Postfix writes them and from here alone, so that every speaker says them the same way.

A message's life, each line spoken by the service Postfix gives it (router/logs/target.py puts
`qrouter/SERVICE[pid]:` in front):

    pickup   QUEUEID: uid=1000 from=<sender>                   taken in from a front door
    cleanup  QUEUEID: message-id=<id@example.org>
    qmgr     QUEUEID: from=<sender>, size=2048, nrcpt=2 (queue active)
    smtp     QUEUEID: to=<rcpt>, relay=mx[192.0.2.1]:25, delay=1.2, delays=0.01/0.03/0.52/0.64,
             dsn=2.0.0, status=sent (250 2.0.0 Ok), attempts=1
    bounce   QUEUEID: sender non-delivery notification: REPORTID
    qmgr     QUEUEID: removed

The first three come when a worker first takes the message into delivery (front doors are other
programs, which cannot write this log): pickup only for a message a front door queued, which is
what the tools count as received; cleanup and qmgr for every message, qrouter's own reports and
split-off parts too. A delivery line has Postfix's fields in Postfix's order, which the tools'
patterns demand; qrouter's own (`attempts=`) come after the status text.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

from policy.next_hop import LMTP, MDA, MX, PIPE, SMTP, queue_name
from router.spool.headers import first_field
from router.spool.queue_file import QueueFile

QMGR, PICKUP, CLEANUP, BOUNCE = "qmgr", "pickup", "cleanup", "bounce"
_SERVICES = {SMTP: "smtp", MX: "smtp", LMTP: "lmtp", MDA: "local", PIPE: "pipe"}


@functools.cache
def logger(service: str) -> logging.Logger:
    """The logger whose lines speak as `service` (router/logs/target.py)."""
    return logging.getLogger(f"qrouter.{service}")


def service_of(kind: str) -> str:
    """The service a next hop's deliveries speak as: Postfix's delivery agent of that kind
    (smtp, lmtp, local, pipe), or NAME for a `queue/NAME` transport, as master.cf names one."""
    return _SERVICES.get(kind) or queue_name(kind) or kind


def _seconds(value: float) -> str:
    """A part of delays=, as Postfix writes it: two significant digits, none finer than 10 ms,
    whole seconds from 10 s on."""
    if value >= 9.995:
        return str(round(value))
    value = round(value, 2)
    return f"{value:.2g}" if value else "0"


@dataclass(frozen=True)
class Delays:
    """Postfix's delays=a/b/c/d of one delivery: a, before the queue manager (arrival until this
    attempt took the message); b, in the queue manager (until the transport began this
    recipient's delivery: routing, earlier next hops, waiting for a session); c, connection set-up
    (DNS, connect, greeting, EHLO, TLS, AUTH); d, transmission. Their sum is delay=."""

    total: float
    before: float
    queue: float
    setup: float
    transmission: float

    @classmethod
    def measure(cls, arrival: float, taken: float, setup: float = 0.0, transmission: float = 0.0) -> Delays:
        """The delays until now of a message that arrived at `arrival` and was taken at `taken`
        (0: not taken, all the time was before the queue manager); `setup` and `transmission`
        are the transport's, 0 for a line no transport made."""
        total = max(0.0, time.time() - arrival)
        before = min(total, max(0.0, taken - arrival)) if taken else total
        setup = min(setup, total - before)
        transmission = min(transmission, total - before - setup)
        return cls(total, before, total - before - setup - transmission, setup, transmission)

    def __str__(self) -> str:
        return "/".join(_seconds(part) for part in (self.before, self.queue, self.setup, self.transmission))


def delivery(service: str, queue_id: str, address: str, *, relay: str, delays: Delays, dsn: str, status: str,
             reply: str, attempts: int | None = None) -> None:
    """The one line per recipient and attempt that administrators and their tools read."""
    logger(service).info("%s: to=<%s>, relay=%s, delay=%.2f, delays=%s, dsn=%s, status=%s (%s)%s", queue_id,
                         address, relay or "none", delays.total, delays, dsn, status, reply,
                         "" if attempts is None else f", attempts={attempts}")


def taken_in(queue_file: QueueFile, owner: int | None) -> None:
    """The lines of a message's first take into delivery: pickup's, with the uid that owns its
    file, for one a front door queued (`owner` None for qrouter's own), then cleanup's and qmgr's."""
    queue_id = queue_file.queue_id
    if owner is not None:
        logger(PICKUP).info("%s: uid=%d from=<%s>", queue_id, owner, queue_file.sender)
    logger(CLEANUP).info("%s: message-id=<%s>", queue_id, message_id(queue_file.message))
    logger(QMGR).info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", queue_id, queue_file.sender,
                      len(queue_file.message), len(queue_file.recipients))


def message_id(message: bytes) -> str:
    """The message's Message-ID without its angle brackets, as cleanup logs it; "" without one."""
    found = first_field(message, "message-id")
    return "" if found is None else found.strip().removeprefix("<").removesuffix(">")
