"""Mail loops between two real daemons end at hopcount-limit with one report per message.

Two spools that route a domain to each other, by queue/router or over SMTP through the aiosmtpd
front door (router/front/aiosmtpd.py), would pass a message back and forth for ever if a hand-off left
no trace. Each hand-off adds a Received: field (router/spool/trace.py), and a message with more than
hopcount-limit of them fails with 5.4.6 and a report to its sender, as in Postfix and Exim. The
hand-offs are followed in the daemons' logs, message by message, from queue id to queue id."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from router.spool import Spool
from tests.daemon import Daemon, wait_for
from tests.test_queue_handler import front, queue_id, send
from tests.test_reports import SENDER, reports, status_groups

LIMIT = 4  # hopcount-limit: small, so that a loop that ends ends quickly
MESSAGES = 5
AT_ONCE = ["--min-backoff", "60", "--me", "relay.qrouter.test"]  # a deferral would show as mail left queued
LOOPING = "x@loop.test"
# One hand-off in a daemon's log: the queue id there, and the one the message got at the other end.
HAND_OFF = re.compile(rf"(\S+): to=<{re.escape(LOOPING)}>, relay=\S+, .*status=sent "
                      r"\((?:queued as|250 2\.0\.0 Queued as) (\S+)\), attempts=\d+$", re.MULTILINE)


@pytest.fixture
def two_daemons(tmp_path) -> Iterator[tuple[Daemon, Daemon]]:
    """Daemons (not started) in tmp_path/a and tmp_path/b, each with its own spool and Maildirs
    (those of `daemons` share one spool); killed after the test if they still run."""
    made = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name).chmod(0o1777)  # for the daemon's user, as tmp_path itself is
        made.append(Daemon(tmp_path / name, workers=1))
    try:
        yield made[0], made[1]
    finally:
        for daemon in made:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.kill()


def route_loop_to(daemon: Daemon, next_hop: str, *args: str) -> None:
    """Route loop.test to `next_hop`; all else (the reports to SENDER) into the daemon's
    Maildirs. Reports are on, the hop limit is LIMIT."""
    transports = daemon.tmp / "transports"
    transports.write_text(f"loop.test {next_hop}\n")
    daemon.args += ["--transports", str(transports), "--send-ndr", "yes", "--hopcount-limit", str(LIMIT), *args]


def hand_offs(first: Daemon, second: Daemon) -> dict[str, str]:
    """Every hand-off of the looping recipient in either log: queue id -> the next one."""
    return dict(HAND_OFF.findall(first.log() + second.log()))


def check_the_loop_ended(first: Daemon, second: Daemon, queued: list[str]) -> None:
    """One report per message, to its sender, for a loop (5.4.6) at the end of its chain of
    hand-offs, which has at most LIMIT + 1 of them; and nothing left in either queue."""
    found = wait_for(lambda: len(reports(first) + reports(second)) >= MESSAGES and reports(first) + reports(second),
                     timeout=120, what=f"{MESSAGES} reports of a loop")
    for daemon in (first, second):
        daemon.wait_idle(timeout=60)
        assert daemon.files("deferred") == daemon.files("hold") == []
    log = first.log() + second.log()
    following = hand_offs(first, second)
    ends = []
    for start in queued:
        chain = [start]
        while chain[-1] in following:
            chain.append(following[chain[-1]])
        assert len(chain) - 1 <= LIMIT + 1, chain
        assert re.search(rf"{chain[-1]}: to=<{re.escape(LOOPING)}>, relay=none, .*dsn=5\.4\.6, status=bounced "
                         rf"\(mail loop: the message has {LIMIT + 1} Received: and Delivered-To: header fields, "
                         rf"more than hopcount-limit {LIMIT}\)", log), chain
        ends.append(chain[-1])
    assert len(following) <= MESSAGES * (LIMIT + 1)
    assert len(found) == MESSAGES and all(report["To"] == SENDER for report in found)
    reported = [status_groups(report)[0]["X-Qrouter-Queue-ID"] for report in found]
    assert sorted(reported) == sorted(ends)  # one report for each message, from where its loop ended
    assert all([(g["Final-Recipient"], g["Status"]) for g in status_groups(report)[1:]] == [
        (f"rfc822; {LOOPING}", "5.4.6")] for report in found)


def test_two_spools_routing_to_each_other_by_queue_router(two_daemons):
    first, second = two_daemons
    route_loop_to(first, f"queue/router {second.spool}")
    route_loop_to(second, f"queue/router {first.spool}")
    first.start()
    second.start()
    spool = Spool(first.spool)
    queued = [spool.enqueue(SENDER, [LOOPING], f"Subject: loop {n}\n\nround and round\n".encode())
              for n in range(MESSAGES)]
    check_the_loop_ended(first, second, queued)


def test_two_daemons_routing_to_each_other_over_smtp_through_aiosmtpd(two_daemons):
    first, second = two_daemons
    with ExitStack() as fronts:
        first_port = fronts.enter_context(front(first.spool))
        second_port = fronts.enter_context(front(second.spool))
        # the SMTP timeouts left at their defaults: a stall of the fronts (in this process) must not
        # defer a hand-off for the 60 s of min-backoff
        route_loop_to(first, f"[127.0.0.1]:{second_port}", *AT_ONCE)
        route_loop_to(second, f"[127.0.0.1]:{first_port}", *AT_ONCE)
        first.start()
        second.start()
        queued = []
        for n in range(MESSAGES):
            code, reply, refused = send(first_port, SENDER, [LOOPING], f"Subject: loop {n}\r\n\r\nround\r\n".encode())
            assert (code, refused) == (250, {})
            queued.append(queue_id(reply))
        check_the_loop_ended(first, second, queued)

