"""Many deliveries at once and destinations the scheduler knows: the concurrency limit per
destination, a dead destination and its recovery, a slow destination beside a fast one, a frozen
worker, and workers that cannot start. Real daemons, real SMTP servers on loopback that answer
slowly (tests/smtp_servers.py CountingSink), real SIGSTOP and rlimits.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import time
from pathlib import Path

import psutil

from router.spool import Spool
from router.spool.queue_file import QueueFile, Recipient
from router.spool.queue_id import arrival_of, new_queue_id
from tests.daemon import freeze, qrouter, wait_for
from tests.smtp_servers import CountingSink

MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


def transports(tmp_path: Path, **ports: int) -> str:
    """A transports file routing `NAME.example` to the sink on loopback at its port."""
    path = tmp_path / "transports"
    path.write_text("".join(f"{name}.example 127.0.0.1:{port}\n" for name, port in ports.items()))
    return str(path)


def test_never_more_sessions_to_a_destination_than_its_limit(daemons, tmp_path):
    with CountingSink(delay=0.1) as sink:
        daemon = daemons("--transports", transports(tmp_path, slow=sink.port), "--destination-concurrency", "3",
                         workers=1)
        spool = Spool(daemon.spool)
        for i in range(30):
            spool.enqueue("a@example.org", [f"u{i}@slow.example"], MESSAGE)
        wait_for(lambda: len(sink.messages) == 30, 30, "all 30 at the sink")
    assert sink.most == 3  # one worker delivers three at once, and never more
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(f"u{i}@slow.example" for i in range(30))


def test_a_slow_destination_does_not_hold_up_a_fast_one(daemons, tmp_path):
    with CountingSink(delay=2.0) as slow, CountingSink() as fast:
        daemon = daemons("--transports", transports(tmp_path, slow=slow.port, fast=fast.port))
        spool = Spool(daemon.spool)
        for i in range(200):
            spool.enqueue("a@example.org", [f"s{i}@slow.example"], MESSAGE)
        time.sleep(1)
        for i in range(20):
            spool.enqueue("a@example.org", [f"f{i}@fast.example"], MESSAGE)
        wait_for(lambda: len(fast.messages) == 20, 10, "the fast destination's mail")
        assert len(slow.messages) < 100  # the slow one is still at it: the fast mail did not wait for it
        assert slow.most <= 20


def deferred_for(spool: Spool, address: str, attempts: int) -> str:
    queue_id = new_queue_id()
    spool.write(QueueFile(queue_id, arrival_of(queue_id), "a@example.org", [Recipient(address)], MESSAGE,
                          attempts=attempts), "deferred")
    return queue_id


def test_a_dead_destination_is_left_alone_until_its_probe_then_its_mail_goes_out_soon(daemons, tmp_path):
    """Ten messages tried five times already (their own next retry would be five minutes away) for
    a host that drops every connection: after one round of failures no connection is made until
    the probe; once the host takes mail again, all ten go out soon after the probe."""
    with CountingSink() as sink:
        sink.accepting = False
        daemon = daemons("--transports", transports(tmp_path, down=sink.port), "--min-backoff", "10",
                         "--max-backoff", "1000", start=False)
        spool = Spool(daemon.spool)
        spool.create()
        for i in range(10):
            deferred_for(spool, f"u{i}@down.example", attempts=5)
        daemon.start()
        wait_for(lambda: "destination smtp:127.0.0.1" in daemon.log() and "is not reachable" in daemon.log(),
                 what="the destination found dead")
        daemon.wait_idle()  # the attempts of the round over
        round_ = sink.connections
        assert 5 <= round_ <= 8  # about one round at the initial window of 5, which shrinks meanwhile
        status = daemon.status()
        [shown] = [d for d in status["destinations"] if d["destination"].endswith(f":{sink.port}")]
        assert shown["dead"] is True and "connection" in shown["last_error"]
        assert shown["deferred"] == 10
        text = qrouter("status", "--queue-dir", str(daemon.spool), check=True).stdout.decode()
        assert f"127.0.0.1:{sink.port}" in text and "dead" in text
        suspended = set(re.findall(r"(\S+): to=<u\d+@down\.example>, relay=none, .*status=deferred \(delivery "
                                   r"temporarily suspended: ", daemon.log()))
        assert len(suspended) == 10 - round_  # every one not tried in the round, none tried
        time.sleep(1)
        assert sink.connections == round_  # nothing until the probe
        sink.accepting = True
        back = time.monotonic()
        wait_for(lambda: len(sink.messages) == 10, 60, "all ten delivered after the probe")
        assert time.monotonic() - back < 40  # the probe (10 s) and the recovery, not their own retry (320 s)
        assert "answers again; retrying the" in daemon.log()


def test_a_frozen_worker_is_killed_and_its_mail_delivered_by_others(daemons, tmp_path):
    with CountingSink(delay=1.0) as sink:  # slow enough that a loaded machine sees a worker at it
        daemon = daemons("--transports", transports(tmp_path, d=sink.port), workers=2)
        spool = Spool(daemon.spool)
        ids = [spool.enqueue("a@example.org", [f"u{i}@d.example"], f"n={i}\r\n".encode()) for i in range(40)]
        pids = daemon.worker_pids()
        frozen = wait_for(lambda: next((w["pid"] for w in daemon.status()["workers"] if w["sessions"]), None),
                          60, "a worker delivering")
        freeze([frozen])
        in_hand = set(daemon.files("active"))
        try:
            wait_for(lambda: f"worker {frozen} has not answered for" in daemon.log(), 40, "the watchdog")
            wait_for(lambda: len({m.content for m in sink.messages}) == 40, 90, "every message delivered")
            # Still frozen until it is killed, however soon the others delivered everything.
            wait_for(lambda: re.search(rf"worker {frozen} has not answered for \d+s; killing it", daemon.log()),
                     30, "the frozen worker killed")
        finally:
            if psutil.pid_exists(frozen):
                os.kill(frozen, signal.SIGCONT)
        wait_for(lambda: all(f"{q}: removed" in daemon.log() for q in ids), what="every message removed")
        contents = [m.content for m in sink.messages]
        twice = {c for c in contents if contents.count(c) > 1}
        assert all(any(f"n={ids.index(q)}".encode() in c for q in in_hand) for c in twice)  # only mail in hand
        # the killed worker is listed until the supervisor has reaped it
        pool = wait_for(lambda: len(found := daemon.worker_pids()) == 2 and frozen not in found and found,
                        what="the pool back to 2 without the frozen worker")
        assert set(pids) - {frozen} <= set(pool)


def test_workers_that_cannot_start_stop_the_daemon_with_the_reason(daemons):
    """A worker that could not start its session threads (here: an address space too small for
    4,000 thread stacks) is not forked again every second forever: the daemon stops, exit 1,
    saying what is short, at once rather than when the mail comes."""
    def small_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    daemon = daemons("--max-sessions", "4000", workers=1, preexec_fn=small_address_space, start=False)
    daemon.start(wait=False)
    assert daemon.process.wait(30) == 1
    log = daemon.log()
    assert "a worker cannot start (the reason is logged above); stopping" in log
    assert len(re.findall(r"worker \d+ cannot start", log)) == 1  # forked once, not again and again
    assert ("4000 session threads need 4000 MB of address space for their stacks, more than half of the limit "
            "(RLIMIT_AS) of 2048 MB: lower max-sessions or raise the limit") in log


def test_status_lists_sessions_and_destinations(daemons, tmp_path):
    with CountingSink(delay=1.0) as sink:
        daemon = daemons("--transports", transports(tmp_path, slow=sink.port))
        spool = Spool(daemon.spool)
        for i in range(4):
            spool.enqueue("a@example.org", [f"u{i}@slow.example"], MESSAGE)
        status = wait_for(lambda: (s := daemon.status())["sessions"] == 4 and s, what="four deliveries at once")
        [shown] = status["destinations"]
        assert (shown["destination"], shown["sessions"], shown["window"], shown["dead"]) == (
            f"smtp:127.0.0.1:{sink.port}", 4, 5, False)
        answer = json.loads(qrouter("status", "--json", "--queue-dir", str(daemon.spool), check=True).stdout)
        assert answer["max_sessions"] == 1000
        wait_for(lambda: len(sink.messages) == 4, what="delivery")
