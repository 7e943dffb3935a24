"""Draining this node to a peer: the daemon's side of `qrouter drain --to HOST[:PORT]`.

A drain takes a node out of a cluster without losing or stranding mail. The mark in the spool
(router/spool/drain.py) makes the front doors refuse new mail; this module turns it into the
routing of every queued recipient to the peer (policy/routing.py `Policy.draining_to`), which the
usual delivery machinery then does: each message is removed only once the peer has said 250 for
its recipients, a peer that says "later" gets it again with backoff, and a message whose attempt
was cut short by a crash is tried again when the daemon starts, where the mark is read again: a
drain resumes by itself.

Held messages (hold/) stay: an administrator held them on purpose. The drain says how many there
are, and one released meanwhile goes to the peer as any other; the drain is done when nothing
but held mail is left.

Progress: the queue counts say what is left (incoming/, active/, deferred/); `sent` counts the
recipients delivered to the peer since the drain began, across restarts: the count is recorded in
the mark every RECORD_SECONDS at most and when the daemon stops, never per message (that would
cost a fsync each), so after a `kill -9` it is behind by what the last seconds delivered.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from policy.next_hop import SMTP, NextHop, NextHopError, parse_next_hop
from policy.routing import Policy
from router.spool.drain import Drain, read_drain, remove_drain, write_drain

log = logging.getLogger("qrouter")

RECORD_SECONDS = 5.0  # the recipients sent to the peer are written into the mark at most this often


class DrainError(ValueError):
    """A drain that cannot begin or end; the message says why."""


def peer_hop(to: str) -> NextHop:
    """The next hop of a drain's peer: one mail server, HOST[:PORT] ([IPv6]:PORT)."""
    try:
        hop = parse_next_hop(to)
    except NextHopError as exc:
        raise DrainError(f"drain --to {to!r}: {exc}") from None
    if hop.kind != SMTP or "," in hop.argument:
        raise DrainError(f"drain --to takes one mail server (HOST, HOST:PORT, [IP]:PORT), not {to!r}")
    return hop


class Drainer:
    """The drain in force on the daemon's spool, if any."""

    def __init__(self, queue_dir: str) -> None:
        self.queue_dir = queue_dir
        self.drain = read_drain(queue_dir)
        self.sent_before = 0  # the daemon's `sent` counter when self.drain.sent was the count
        self.recorded = time.monotonic()
        if self.drain is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.drain.started))
            log.warning("draining to %s (since %s, %d recipient(s) sent there): the front doors refuse new mail; "
                        "qrouter drain --cancel ends it", self.drain.to, since, self.drain.sent)

    def applied(self, policy: Policy) -> Policy:
        """The policy the workers route by: `policy`, or it drained to the peer."""
        if self.drain is None:
            return policy
        try:
            return policy.draining_to(peer_hop(self.drain.to))
        except DrainError as exc:  # a mark edited by hand: mail stays where it is until cancelled
            log.error("%s; mail stays queued here until qrouter drain --cancel", exc)
            return policy

    def begin(self, to: str, sent: int) -> Drain:
        """Mark the spool as draining to `to` (durably: before any mail goes there)."""
        peer_hop(to)
        if self.drain is not None and self.drain.to != to:
            raise DrainError(f"already draining to {self.drain.to}; qrouter drain --cancel first")
        if self.drain is None:
            self.drain = Drain(to, time.time())
            write_drain(self.queue_dir, self.drain)
            self.sent_before = sent
            log.warning("drain to %s begun: the front doors refuse new mail, and every queued message goes there",
                        to)
        return self.drain

    def cancel(self) -> Drain:
        if self.drain is None:
            raise DrainError("no drain in progress")
        drain, self.drain = self.drain, None
        remove_drain(self.queue_dir)
        log.warning("drain to %s cancelled: mail is taken and routed as before", drain.to)
        return drain

    def sent(self, counted: int) -> int:
        """The recipients sent to the peer in this drain, given the daemon's `sent` counter."""
        return 0 if self.drain is None else self.drain.sent + counted - self.sent_before

    def record(self, counted: int, *, stopping: bool = False) -> None:
        """Write the count into the mark if it changed, at most every RECORD_SECONDS, and when the
        daemon stops. OSError if the spool refuses it (the count is kept here, and tried again).
        A mark that names no peer (edited by hand, unreadable) is left as it is."""
        if self.drain is None or (not stopping and time.monotonic() - self.recorded < RECORD_SECONDS):
            return
        try:
            peer_hop(self.drain.to)
        except DrainError:
            return
        self.recorded = time.monotonic()
        total = self.sent(counted)
        if total != self.drain.sent:
            drain = replace(self.drain, sent=total)
            write_drain(self.queue_dir, drain)
            self.drain, self.sent_before = drain, counted

    def status(self, counted: int) -> dict[str, Any] | None:
        """For the status answer: the peer, since when, and the recipients sent there."""
        if self.drain is None:
            return None
        return {"to": self.drain.to, "started": self.drain.started, "sent": self.sent(counted)}
