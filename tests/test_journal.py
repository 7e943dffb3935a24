"""The journal: a recipient's result is durable before the next hop of the same message is tried,
so a worker killed between two next hops never delivers twice to the first one's recipients."""

from __future__ import annotations

import os
import signal

from policy.next_hop import NextHop, parse_next_hop
from policy.routing import Policy, Route
from router.config import load
from router.spool import ACTIVE, INCOMING, Spool
from router.spool.queue_file import DELIVERED, PENDING, parse
from workers.delivery import Delivery
from workers.worker import build_transports

KILL = NextHop("kill", "", "a next hop whose delivery kills the worker")


class SplitPolicy(Policy):
    """Routes each recipient by its domain: the split a transport map will make."""

    def __init__(self, hops: dict[str, NextHop]):
        super().__init__(None)
        self.hops = hops

    def route(self, recipient: str) -> Route:
        return Route(self.hops[recipient.rpartition("@")[2]], "test split")


class KillTransport:
    def deliver(self, message, recipients, hop):
        os.kill(os.getpid(), signal.SIGKILL)

    def close_idle(self) -> None:
        pass


def attempt_in_child(spool: Spool, policy: Policy, queue: str, queue_id: str) -> int:
    """One delivery attempt in a forked process, as a worker makes it; returns the wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            config = load(None, {"queue-dir": str(spool.root)})
            transports = {**build_transports(config), "kill": KillTransport()}
            Delivery(spool, config, policy, transports).attempt(queue, queue_id)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def test_crash_between_next_hops_does_not_redeliver(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    maildir = parse_next_hop(f"queue/maildir {tmp_path}/mail/%d/%u")
    queue_id = spool.enqueue("a@example.org", ["first@one.example", "second@two.example"], b"once\n")

    status = attempt_in_child(spool, SplitPolicy({"one.example": maildir, "two.example": KILL}), INCOMING, queue_id)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    active = tmp_path / "spool" / "active" / queue_id
    crashed = parse(active.read_bytes(), str(active))
    assert [r.state for r in crashed.recipients] == [DELIVERED, PENDING]
    assert crashed.journal_bytes > 0

    spool.move(queue_id, ACTIVE, INCOMING)  # as the next start does
    status = attempt_in_child(spool, SplitPolicy({"one.example": maildir, "two.example": maildir}), INCOMING, queue_id)
    assert status == 0
    assert len(os.listdir(tmp_path / "mail" / "one.example" / "first" / "new")) == 1
    assert len(os.listdir(tmp_path / "mail" / "two.example" / "second" / "new")) == 1
    assert spool.list(ACTIVE) == spool.list(INCOMING) == spool.list("deferred") == []
