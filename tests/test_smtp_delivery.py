"""SMTP delivery through the real daemon: relay hosts, round robin, failover, MX routing,
per-recipient results, kept connections. Real aiosmtpd servers and a real DNS server, loopback only."""

from __future__ import annotations

from collections import Counter

from router.spool import Spool
from router.spool.queue_file import DELIVERED, FAILED, PENDING, parse
from tests.daemon import wait_for
from tests.dns_server import DNSServer
from tests.smtp_servers import AioServer, Recorder, free_port

FAST = ["--smtp-timeouts", "connect=2,greeting=3,helo=3,mail=3,rcpt=3,data=3,block=3,dot=3",
        "--min-backoff", "60", "--me", "relay.qrouter.test"]


def enqueue(daemon, recipients, body=b"Subject: t\r\n\r\nbody\r\n", sender="s@example.org") -> str:
    return Spool(daemon.spool).enqueue(sender, recipients, body)


def test_relayhost_gets_the_message_byte_for_byte(daemons):
    body = b"Subject: relay\n\n.leading dot\nline two\n"
    with AioServer() as sink:
        daemon = daemons("--relayhost", f"127.0.0.1:{sink.port}", *FAST)
        queue_id = enqueue(daemon, ["a@example.org", "b@example.net"], body)
        wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery")
    [received] = sink.handler.messages
    assert received.content == b"Subject: relay\r\n\r\n.leading dot\r\nline two\r\n"
    assert (received.mail_from, received.rcpt_tos) == ("s@example.org", ["a@example.org", "b@example.net"])
    assert sink.handler.hellos == ["relay.qrouter.test"]
    line = next(ln for ln in daemon.log().splitlines() if "to=<a@example.org>" in ln)
    assert f"relay=127.0.0.1[127.0.0.1]:{sink.port}," in line
    assert "dsn=2.0.0, status=sent (250 2.0.0 queued as 4711)" in line


def test_per_recipient_replies_give_exactly_those_outcomes(daemons):
    handler = Recorder(rcpt={"gone@example.org": "550 5.1.1 no such user",
                             "later@example.org": "450 4.2.1 mailbox busy"})
    with AioServer(handler) as sink:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{sink.port}", "--archive-failed", "yes", *FAST)
        queue_id = enqueue(daemon, ["ok@example.org", "gone@example.org", "later@example.org"])
        deferred = daemon.spool / "deferred" / queue_id
        wait_for(deferred.exists, what="deferral")
    stored = parse(deferred.read_bytes(), str(deferred))
    assert [(r.address, r.state, r.dsn) for r in stored.recipients] == [
        ("ok@example.org", DELIVERED, "2.0.0"), ("gone@example.org", FAILED, "5.1.1"),
        ("later@example.org", PENDING, "4.2.1")]
    assert sink.handler.messages[0].rcpt_tos == ["ok@example.org"]
    log = daemon.log()
    assert "said: 550 5.1.1 no such user (in reply to RCPT TO command)" in log
    assert "to=<gone@example.org>" in log and "status=bounced" in log


def test_relay_round_robin_and_failover(daemons):
    with AioServer(host="127.0.0.2") as first, AioServer(host="127.0.0.3") as second:
        dead = free_port("127.0.0.4")
        relays = f"[127.0.0.4]:{dead},[127.0.0.2]:{first.port},[127.0.0.3]:{second.port}"
        daemon = daemons("--relayhost", relays, *FAST, workers=1)
        ids = [enqueue(daemon, [f"u{i}@example.org"]) for i in range(6)]
        wait_for(lambda: all(f"{q}: removed" in daemon.log() for q in ids), what="six deliveries")
    # one worker rotates its starting host each message; the dead one hands over to the next
    assert len(first.handler.messages) + len(second.handler.messages) == 6
    assert len(first.handler.messages) >= 2 and len(second.handler.messages) >= 2


ZONE = """
example.test. 60 IN MX 10 primary.example.test.
example.test. 60 IN MX 20 backup.example.test.
primary.example.test. 60 IN A 127.0.0.2
backup.example.test. 60 IN A 127.0.0.3
nomail.test. 60 IN MX 0 .
"""


def test_mx_routing_by_preference_with_fallback_null_mx_and_nxdomain(daemons):
    with AioServer(host="127.0.0.3") as backup, DNSServer(ZONE, origin="test.") as dns:
        # nothing listens on 127.0.0.2 at that port: the preferred MX is down
        daemon = daemons("--dns-servers", dns.servers, "--smtp-port", str(backup.port), *FAST, maildir=False)
        good = enqueue(daemon, ["user@example.test"])
        null = enqueue(daemon, ["user@nomail.test"])
        missing = enqueue(daemon, ["user@nowhere.test"])
        wait_for(lambda: all(f"{q}: removed" in daemon.log() for q in (good, null, missing)), what="three results")
    assert [m.rcpt_tos for m in backup.handler.messages] == [["user@example.test"]]
    log = daemon.log()
    assert f"to=<user@example.test>, relay=backup.example.test[127.0.0.3]:{backup.port}," in log
    null_line = next(ln for ln in log.splitlines() if "to=<user@nomail.test>" in ln)
    assert "dsn=5.1.10, status=bounced" in null_line and "nomail.test" in null_line
    missing_line = next(ln for ln in log.splitlines() if "to=<user@nowhere.test>" in ln)
    assert "dsn=5.1.2, status=bounced" in missing_line


def test_a_stream_of_mail_to_one_domain_asks_dns_each_question_once_within_its_ttl(daemons):
    """A worker keeps DNS answers for their TTL (60 s here), as a local caching resolver would:
    eleven messages to one domain ask for its MX records and each host's addresses once, where
    each delivery used to ask them all again."""
    with AioServer(host="127.0.0.2") as primary, DNSServer(ZONE, origin="test.") as dns:
        daemon = daemons("--dns-servers", dns.servers, "--smtp-port", str(primary.port), *FAST, workers=1,
                         maildir=False)
        first = enqueue(daemon, ["user@example.test"])
        wait_for(lambda: f"{first}: removed" in daemon.log(), what="the first delivery")
        others = [enqueue(daemon, [f"user{i}@example.test"]) for i in range(10)]
        wait_for(lambda: all(f"{q}: removed" in daemon.log() for q in others), what="ten more deliveries")
    assert len(primary.handler.messages) == 11
    asked = Counter((query.name, query.rdtype) for query in dns.queries)
    assert asked[("example.test", "MX")] == 1
    assert asked[("primary.example.test", "A")] == 1
    assert max(asked.values()) == 1, asked


def test_kept_connection_carries_the_next_message(daemons):
    with AioServer() as sink:
        # a long idle timeout: a stall of this process must not close the connection before it is reused
        daemon = daemons("--relayhost", f"127.0.0.1:{sink.port}", "--smtp-idle-timeout", "10", *FAST, workers=1)
        first = enqueue(daemon, ["a@example.org"])
        wait_for(lambda: f"{first}: removed" in daemon.log(), what="first delivery")
        second = enqueue(daemon, ["b@example.org"])
        wait_for(lambda: f"{second}: removed" in daemon.log(), what="second delivery")
        wait_for(lambda: "QUIT" in sink.handler.commands, timeout=30, what="QUIT after the idle timeout")
    commands = sink.handler.commands
    assert commands.count("QUIT") == 1 and "RSET" in commands
    assert len(sink.handler.messages) == 2


def test_relay_over_ipv6(daemons):
    with AioServer(host="::1") as sink:
        daemon = daemons("--relayhost", f"[::1]:{sink.port}", *FAST)
        queue_id = enqueue(daemon, ["v6@example.org"])
        wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery over IPv6")
    assert [m.rcpt_tos for m in sink.handler.messages] == [["v6@example.org"]]
    assert f"relay=::1[::1]:{sink.port}," in daemon.log()
