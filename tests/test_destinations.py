"""Destinations as queues, with the real daemon: a dead destination holds back only its own
recipients, its suspended mail still expires and is reported, its counts stay exact, connection
limits hold over all workers, and nothing waits for a destination when what it lacks is a
worker."""

from __future__ import annotations

import re
import signal
import statistics
import time
from itertools import pairwise
from pathlib import Path

import pytest

from router.spool import Spool
from tests.daemon import qrouter, wait_for
from tests.nsd_server import NSD
from tests.smtp_servers import CountingSink

MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


def transports(tmp_path: Path, *lines: str, **ports: int) -> str:
    """A transports file routing `NAME.example` to the sink on loopback at its port, and more lines."""
    path = tmp_path / "transports"
    path.write_text("".join(f"{name}.example 127.0.0.1:{port}\n" for name, port in ports.items())
                    + "".join(f"{line}\n" for line in lines))
    return str(path)


def kill_destination(daemon, spool: Spool, domain: str) -> None:
    """Queue a round of mail to a destination that is down until the daemon finds it dead, and
    wait for the round's attempts to end (one begun before the death may still connect)."""
    for i in range(5):
        spool.enqueue("a@example.org", [f"round{i}@{domain}"], MESSAGE)
    wait_for(lambda: "is not reachable" in daemon.log(), 30, "the destination found dead")
    daemon.wait_idle()


def reporting(daemons, tmp_path: Path, down: CountingSink, reports: CountingSink, *args: str):
    """A daemon with reports on, routing `down.example` to `down` and the senders' domain to `reports`."""
    return daemons("--transports", transports(tmp_path, down=down.port, sender=reports.port), "--send-ndr", "yes",
                   *args)


def destination(daemon, port: int) -> dict:
    return next((d for d in daemon.status()["destinations"] if d["destination"].endswith(f":{port}")), {})


def test_a_dead_destination_defers_only_its_own_recipients_and_gets_them_when_it_revives(daemons, tmp_path):
    with CountingSink() as down, CountingSink() as up:
        down.accepting = False
        # probed 10 s after it died: time for the mixed message to find it dead, rather than go as the probe
        daemon = daemons("--transports", transports(tmp_path, down=down.port, up=up.port), "--min-backoff", "10",
                         "--max-backoff", "10")
        spool = Spool(daemon.spool)
        kill_destination(daemon, spool, "down.example")
        queue_id = spool.enqueue("a@example.org", ["ok@up.example", "dead@down.example"], MESSAGE)
        wait_for(lambda: any(m.rcpt_tos == ["ok@up.example"] for m in up.messages), 30, "the healthy recipient")
        # the recipients' lines come before this one, and only after the sink has the message
        wait_for(lambda: f"{queue_id}: deferred, next attempt in " in daemon.log(), 30, "the attempt logged")
        log = daemon.log()
        assert re.search(rf"{queue_id}: to=<ok@up\.example>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{up.port}, "
                         r"delay=[\d.]+, delays=[\d./]+, dsn=2\.0\.0, status=sent \(.*\), attempts=1\n", log)
        assert re.search(rf"{queue_id}: to=<dead@down\.example>, relay=none, .*status=deferred \(delivery "
                         rf"temporarily suspended: smtp:127\.0\.0\.1:{down.port}: ", log)
        assert not re.search(rf"{queue_id}: to=<ok@up\.example>.*status=deferred", log)  # never held back
        down.accepting = True
        wait_for(lambda: any(m.rcpt_tos == ["dead@down.example"] for m in down.messages), 30, "the revived one")
        wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="the message done")
        assert [m.rcpt_tos for m in up.messages] == [["ok@up.example"]]  # nothing twice
        assert sum(m.rcpt_tos == ["dead@down.example"] for m in down.messages) == 1


def test_mail_suspended_for_a_dead_destination_expires_on_time_with_its_report(daemons, tmp_path):
    """A thousand messages for a destination that stays dead and a max-age of a few seconds: every
    one fails 4.4.7 with its report within a probe interval of expiring, and none is attempted
    more than the probes."""
    with CountingSink() as down, CountingSink() as reports:
        down.accepting = False
        max_age = 10.0
        daemon = reporting(daemons, tmp_path, down, reports, "--min-backoff", "5", "--max-backoff", "5",
                           "--max-age", f"{max_age / 86400:.8f}")
        spool = Spool(daemon.spool)
        started = time.time()
        ids = [spool.enqueue("someone@sender.example", [f"u{i}@down.example"], MESSAGE) for i in range(1000)]
        queued = time.time()  # the last one's arrival: queueing a thousand can take half a minute under load
        wait_for(lambda: len(reports.messages) == 1000, 180, "a report for every message")
        done = time.time()
        log = daemon.log()
        expired = re.findall(r"(\S+): to=<u\d+@down\.example>, .*dsn=4\.4\.7, status=expired", log)
        assert sorted(expired) == sorted(ids)
        assert all(b"Status: 4.4.7" in m.content for m in reports.messages)
        probes = (done - started) / 5 + 2
        assert down.connections <= 5 + probes, (down.connections, probes)  # one round, then the probes only
        assert done - queued < max_age + 5 + 60  # expiry, one probe interval, and time for 1,000 reports
        wait_for(lambda: not daemon.files("deferred") and not daemon.files("incoming"), 60, "an empty queue")


def test_mail_suspended_for_a_dead_destination_gets_its_delay_warning_on_time(daemons, tmp_path):
    """delay-warning of a few seconds, a destination that stays dead and a probe a minute apart:
    every message's sender is warned about when the warning is due, not at the next probe."""
    with CountingSink() as down, CountingSink() as reports:
        down.accepting = False
        warning = 5.0
        daemon = reporting(daemons, tmp_path, down, reports, "--min-backoff", "60", "--max-backoff", "60",
                           "--delay-warning", f"{warning / 3600:.8f}")
        spool = Spool(daemon.spool)
        kill_destination(daemon, spool, "down.example")
        round_ = down.connections
        # the window of 5 shrinks with each failure: four in a row make it dead if the fifth had not begun
        assert 4 <= round_ <= 5
        ids = [spool.enqueue("someone@sender.example", [f"w{i}@down.example"], MESSAGE) for i in range(20)]
        wait_for(lambda: all(f"{queue_id}: sender delay notification:" in daemon.log() for queue_id in ids), 45,
                 "a delay warning for each, before the probe a minute after the destination died")
        assert all(re.search(rf"{queue_id}: to=<w\d+@down\.example>, relay=none, .*delivery temporarily suspended",
                             daemon.log()) for queue_id in ids)
        assert down.connections == round_  # nothing since the round that found it dead


def test_per_destination_counts_stay_exact_through_holds_deletes_and_deliveries(daemons, tmp_path):
    with CountingSink() as down:
        down.accepting = False
        daemon = daemons("--transports", transports(tmp_path, down=down.port), "--min-backoff", "3",
                         "--max-backoff", "3")
        spool = Spool(daemon.spool)
        kill_destination(daemon, spool, "down.example")
        wait_for(lambda: destination(daemon, down.port).get("deferred") == 5, 30, "five deferred for it")
        held, deleted = daemon.files("deferred")[:2]
        qrouter("queue", "hold", held, "--queue-dir", str(daemon.spool), check=True)
        wait_for(lambda: destination(daemon, down.port).get("deferred") == 4, 10, "four after a hold")
        qrouter("queue", "delete", deleted, "--yes", "--queue-dir", str(daemon.spool), check=True)
        wait_for(lambda: destination(daemon, down.port).get("deferred") == 3, 10, "three after a delete")
        why = qrouter("queue", "why", daemon.files("deferred")[0], "--queue-dir", str(daemon.spool),
                      "--transports", str(tmp_path / "transports"), check=True).stdout.decode()
        assert "dead: " in why and "3 deferred for it" in why, why
        down.accepting = True
        wait_for(lambda: len(down.messages) == 3, 30, "the rest delivered after the probe")
        wait_for(lambda: destination(daemon, down.port).get("deferred", 0) == 0, 10, "none deferred")


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("limit", [1, 3, 20])
def test_connections_to_a_destination_never_pass_its_limit_and_reach_it_under_load(daemons, tmp_path, workers,
                                                                                     limit):
    """Connections in use and kept idle, over all workers: at most the limit, whatever the
    number of workers; and a limit of N lets N deliveries run at once."""
    with CountingSink(delay=0.05) as sink:
        daemon = daemons("--transports", transports(tmp_path, d=sink.port), "--destination-concurrency",
                         str(limit), workers=workers, start=False)
        spool = Spool(daemon.spool)
        spool.create()
        count = 4 * limit + 20
        for i in range(count):  # all queued before the start: the window grows only while a line waits
            spool.enqueue("a@example.org", [f"u{i}@d.example"], MESSAGE)
        daemon.start()
        wait_for(lambda: len(sink.messages) == count, 60, "every message at the sink")
        assert sink.most == limit


def test_a_message_waits_for_a_worker_of_its_kind_not_for_its_destination(daemons, tmp_path):
    """local-sessions 1 and a slow pipe: a message to a second pipe destination goes as soon as
    the one local session is free, though nothing else ever goes to its own destination."""
    slow = tmp_path / "slow.sh"
    slow.write_text(f"#!/bin/sh\ncat >/dev/null\ntouch {tmp_path}/out/slow-started\nsleep 3\n")
    fast = tmp_path / "fast.sh"
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    fast.write_text(f"#!/bin/sh\ncat >{out}/$$\n")
    for script in (slow, fast):
        script.chmod(0o755)
    daemon = daemons("--transports", transports(tmp_path, f"slow.example |{slow}", f"fast.example |{fast}"),
                     "--local-sessions", "1")
    spool = Spool(daemon.spool)
    spool.enqueue("a@example.org", ["x@slow.example"], MESSAGE)
    wait_for(lambda: (out / "slow-started").exists(), 20, "the slow pipe running")
    queue_id = spool.enqueue("a@example.org", ["y@fast.example"], MESSAGE)
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), 30, "the second pipe's message delivered")
    assert len(list(out.iterdir())) == 2  # its output, and the slow one's mark



PROVIDER = "mx1.provider.test,mx2.provider.test"


def rollup_zone(domains: int) -> str:
    """`d0.test` ... hosted at one provider (two MX hosts), `own.test` with an MX host of its own,
    `optout.test` at the provider but kept apart by its rule; every host is this machine."""
    lines = [f"d{i}.test. 60 IN MX 10 mx1.provider.test." for i in range(domains)]
    lines += [f"d{i}.test. 60 IN MX 20 mx2.provider.test." for i in range(domains)]
    lines += ["optout.test. 60 IN MX 10 mx1.provider.test.", "optout.test. 60 IN MX 20 mx2.provider.test.",
              "own.test. 60 IN MX 10 mx.own.test.", "mx1.provider.test. 60 IN A 127.0.0.1",
              "mx2.provider.test. 60 IN A 127.0.0.1", "mx.own.test. 60 IN A 127.0.0.1"]
    return "\n".join(lines) + "\n"


def test_mx_rollup_counts_the_domains_of_one_provider_against_one_site(daemons, tmp_path):
    """Two hundred domains whose MX records name the same two hosts: one site, whose limit holds
    over all of them from the first message on; a domain with its own MX host is its own
    destination; mx-rollup=no keeps a domain apart. The names are served by NSD, a real
    authoritative server."""
    (tmp_path / "destinations").write_text(f"{PROVIDER} concurrency=3\noptout.test mx-rollup=no concurrency=1\n")
    with CountingSink(delay=0.01) as sink, NSD(rollup_zone(200), origin="test.") as dns:
        daemon = daemons("--dns-servers", dns.servers, "--smtp-port", str(sink.port), "--destinations",
                         str(tmp_path / "destinations"), "--smtp-idle-timeout", "60", workers=2, maildir=False)
        spool = Spool(daemon.spool)
        for i in range(400):
            spool.enqueue("a@example.org", [f"u{i}@d{i % 200}.test"], MESSAGE)
        wait_for(lambda: len(sink.messages) == 400, 120, "all 400 at the provider")
        assert sink.most == 3  # the site's limit, over two hundred domains and two workers
        [site] = [d for d in daemon.status()["destinations"] if d["destination"] == f"site:{PROVIDER}"]
        assert site["domains"] == 200 and site["limit"] == 3 and site["kept"] <= 3
        route = qrouter("route", "--resolve", "--dns-servers", dns.servers, "--destinations",
                        str(tmp_path / "destinations"), "u@d7.test", check=True).stdout.decode()
        assert f"site:{PROVIDER}" in route and "concurrency=3" in route
        own = spool.enqueue("a@example.org", ["x@own.test"], MESSAGE)
        apart = spool.enqueue("a@example.org", ["y@optout.test"], MESSAGE)
        wait_for(lambda: f"{own}: removed" in daemon.log() and f"{apart}: removed" in daemon.log(), 30, "both")
        shown = {d["destination"]: d for d in daemon.status()["destinations"]}
        assert shown["site:mx.own.test"]["domains"] == 1
        assert shown["mx:optout.test"]["limit"] == 1 and shown["mx:optout.test"]["domains"] == 0
        assert shown[f"site:{PROVIDER}"]["domains"] == 200  # optout.test is not in it


def with_rule(daemons, tmp_path: Path, sink: CountingSink, settings: str, *args: str, **options) -> tuple:
    """A daemon routing `d.example` to the sink, with one destinations rule for it: (daemon, spool, rules file)."""
    rules = tmp_path / "destinations"
    rules.write_text(f"smtp:127.0.0.1:{sink.port} {settings}\n")
    daemon = daemons("--transports", transports(tmp_path, d=sink.port), "--destinations", str(rules), *args,
                     **options)
    return daemon, Spool(daemon.spool), rules


def test_recipients_per_transaction_and_messages_per_connection_from_the_destinations_file(daemons, tmp_path):
    with CountingSink() as sink:
        # the connection kept idle between the two batches however slow the test is
        daemon, spool, _ = with_rule(daemons, tmp_path, sink, "concurrency=1 messages-per-connection=2",
                                     "--smtp-idle-timeout", "60", workers=1)
        big = spool.enqueue("a@example.org", [f"u{i}@d.example" for i in range(120)], MESSAGE)
        wait_for(lambda: f"{big}: removed" in daemon.log(), 30, "the 120-recipient message")
        assert [len(m.rcpt_tos) for m in sink.messages] == [50, 50, 20]  # Postfix's default of 50
        for i in range(5):
            spool.enqueue("a@example.org", [f"v{i}@d.example"], MESSAGE)
        wait_for(lambda: len(sink.messages) == 8, 30, "five more")
        per_connection = [sum(line.startswith("MAIL") for batch in talk for line in batch)
                          for talk in sink.conversations]
        assert per_connection == [3 + 1, 2, 2]  # a message in three transactions counts once


def test_a_rate_limit_holds_over_a_minute(daemons, tmp_path):
    with CountingSink() as sink:
        _, spool, _ = with_rule(daemons, tmp_path, sink, "rate=120/min")
        for i in range(150):
            spool.enqueue("a@example.org", [f"u{i}@d.example"], MESSAGE)
        wait_for(lambda: sink.messages, 20, "the first message")
        first = sink.messages[0].at
        time.sleep(61)
        arrivals = sorted(m.at for m in list(sink.messages) if m.at < first + 60)
        assert len(arrivals) <= 132, len(arrivals)  # 120 a minute, 10% more at most
        # Not a count from below: each late wake of the daemon pushes every later start back. Most
        # starts are one interval apart, however many stalls there were.
        gap = statistics.median(b - a for a, b in pairwise(arrivals))
        assert 0.45 <= gap <= 0.6, (gap, len(arrivals))


def test_a_reload_applies_new_settings_to_a_destination_already_known(daemons, tmp_path):
    with CountingSink(delay=0.05) as sink:
        # its connection kept idle, the destination stays known: through the reload, and for the limit shown
        daemon, spool, rules = with_rule(daemons, tmp_path, sink, "concurrency=1", "--smtp-idle-timeout", "60")
        for i in range(10):
            spool.enqueue("a@example.org", [f"u{i}@d.example"], MESSAGE)
        wait_for(lambda: len(sink.messages) == 10, 30, "ten at one at a time")
        assert sink.most == 1
        rules.write_text(f"smtp:127.0.0.1:{sink.port} concurrency=4 initial-window=4\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in daemon.log(), 20, "the reload")
        daemon.signal(signal.SIGSTOP)  # all forty in line at once: the window of 1 grows only while a line waits
        try:
            for i in range(40):
                spool.enqueue("a@example.org", [f"v{i}@d.example"], MESSAGE)
        finally:
            daemon.signal(signal.SIGCONT)
        wait_for(lambda: len(sink.messages) == 50, 60, "forty more, four at a time")
        assert sink.most == 4
        assert destination(daemon, sink.port).get("limit") == 4


def test_a_message_goes_as_soon_as_the_one_session_is_free(daemons, tmp_path):
    """max-sessions 1, one worker, a pipe rule in the policy (so local workers exist too), and a
    next hop that never greets holding the only session: the next message goes once the greeting
    times out, not at some later turn."""
    with CountingSink(delay=60) as tarpit, CountingSink() as sink:
        daemon = daemons("--transports", transports(tmp_path, "pipe.example |/bin/true", tar=tarpit.port,
                                                    ok=sink.port),
                         "--max-sessions", "1", "--smtp-timeouts", "greeting=4", workers=1)
        spool = Spool(daemon.spool)
        stuck = spool.enqueue("a@example.org", ["x@tar.example"], MESSAGE)
        wait_for(lambda: tarpit.open == 1, 20, "the tarpit holding the only session")
        waiting = spool.enqueue("a@example.org", ["y@ok.example"], MESSAGE)
        wait_for(lambda: f"{stuck}: deferred" in daemon.log(), 30, "the greeting timed out")
        wait_for(lambda: f"{waiting}: removed" in daemon.log(), 30, "the waiting message delivered")
        assert [m.rcpt_tos for m in sink.messages] == [["y@ok.example"]]
        # it did wait for the session: the worker logs the deferral before it reports the session free
        log = daemon.log()
        assert log.index(f"{stuck}: deferred") < log.index(f"{waiting}: to=<y@ok.example>"), log
