"""Recipient verification that asks the next hop (a callout): a real daemon whose transports file
sends relay.test to a loopback sink (tests/smtp_servers.CountingSink, which counts connections
and keeps every command), with `callout=yes` for that next hop in the destinations file; and a
real Dovecot LMTP (tests/dovecot_server.py) as the next hop that knows its users."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from router.daemon.status_socket import query
from router.spool import Spool
from tests.daemon import qrouter, wait_for
from tests.dovecot_server import DovecotLMTP
from tests.smtp_servers import CountingSink, free_port

UNKNOWN = "550 5.1.1 no such user here"
FIRST_ASK = ("--verify-wait", "4.5")  # the longest wait: a first ask's probe has its answer in time under load


def callout_daemon(daemons, tmp_path, port: int, *args: str, settings: str = "callout=yes", **kwargs):
    (tmp_path / "transports").write_text(f"relay.test [127.0.0.1]:{port}\n")
    (tmp_path / "destinations").write_text(f"smtp:[127.0.0.1]:{port} {settings}\n")
    return daemons("--transports", str(tmp_path / "transports"), "--destinations", str(tmp_path / "destinations"),
                   "--smtp-timeouts", "connect=5,greeting=20,helo=20,mail=20,rcpt=20,rset=20,quit=20", *args,
                   **kwargs)


def verify(daemon, address: str) -> dict:
    return query(str(daemon.spool / "status.sock"), {"command": "verify", "recipient": address})


def commands(sink: CountingSink) -> list[list[str]]:
    """Each connection's command lines, in order."""
    return [[line for batch in conversation for line in batch] for conversation in sink.conversations]


@pytest.fixture
def sink():
    with CountingSink(refuse={"nobody@relay.test": UNKNOWN}) as running:
        yield running


def test_the_next_hop_s_answer_at_once_then_from_the_cache_without_a_connection(daemons, tmp_path, sink):
    daemon = callout_daemon(daemons, tmp_path, sink.port, *FIRST_ASK)
    refused = verify(daemon, "nobody@relay.test")
    assert (refused["verdict"], refused["code"], refused["dsn"]) == ("refused", 550, "5.1.1")
    assert f"host 127.0.0.1[127.0.0.1]:{sink.port} said: {UNKNOWN} (in reply to RCPT TO command)" in refused["text"]
    assert verify(daemon, "someone@relay.test")["verdict"] == "deliverable"
    assert sink.connections == 2
    for conversation in commands(sink):
        verbs = [line.split(" ")[0].split(":")[0] for line in conversation]
        assert verbs == ["EHLO", "MAIL", "RCPT", "RSET", "QUIT"], conversation
        assert conversation[1] == "MAIL FROM:<>"
    assert sink.messages == []

    assert verify(daemon, "nobody@relay.test")["dsn"] == "5.1.1"
    assert verify(daemon, "someone@relay.test")["verdict"] == "deliverable"
    assert sink.connections == 2, "answered from the cache"
    state = daemon.status()["verify"]
    assert (state["cache"], state["hits"], state["misses"], state["hit_rate"]) == (2, 2, 2, 0.5)
    result = qrouter("verify", "--queue-dir", str(daemon.spool), "nobody@relay.test")
    assert result.returncode == 1 and result.stdout.decode().startswith("550 5.1.1 host 127.0.0.1")


def test_the_cache_survives_a_restart(daemons, tmp_path, sink):
    daemon = callout_daemon(daemons, tmp_path, sink.port, *FIRST_ASK)
    assert verify(daemon, "nobody@relay.test")["dsn"] == "5.1.1"
    assert daemon.stop() == 0
    assert (daemon.spool / "verify-cache").exists()
    daemon.start()
    assert verify(daemon, "nobody@relay.test")["dsn"] == "5.1.1"
    assert sink.connections == 1
    assert daemon.status()["verify"]["hits"] == 1


def test_a_dead_next_hop_gives_temporary_answers_never_550(daemons, tmp_path):
    daemon = callout_daemon(daemons, tmp_path, free_port())  # nothing listens there
    for _ in range(2):
        answer = verify(daemon, "nobody@relay.test")
        assert answer["verdict"] == "temporary" and answer["code"] == 450, answer
    result = qrouter("verify", "--queue-dir", str(daemon.spool), "nobody@relay.test")
    assert result.returncode == 75 and result.stdout.decode().startswith("450 4.")


def test_while_a_slow_probe_runs_the_answer_is_450_4_1_1_and_one_probe_serves_all(daemons, tmp_path):
    with CountingSink(delay=1.0, refuse={"nobody@relay.test": UNKNOWN}) as slow:  # 5 replies: 5 s a probe
        daemon = callout_daemon(daemons, tmp_path, slow.port, "--verify-wait", "0.5")
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda _: verify(daemon, "nobody@relay.test"), range(5)))
        assert {(a["code"], a["dsn"], a["text"]) for a in answers} == {
            (450, "4.1.1", "address verification in progress")}
        wait_for(lambda: daemon.status()["verify"]["cache"] == 1, timeout=60, what="the probe's result")
        assert verify(daemon, "nobody@relay.test")["dsn"] == "5.1.1"
        assert slow.connections == 1


def test_a_negative_result_expires_and_is_probed_again(daemons, tmp_path, sink):
    daemon = callout_daemon(daemons, tmp_path, sink.port, *FIRST_ASK, "--verify-negative-expire", "0.00003")  # 2.6 s
    assert verify(daemon, "nobody@relay.test")["dsn"] == "5.1.1"
    assert verify(daemon, "nobody@relay.test")["dsn"] == "5.1.1"
    assert sink.connections == 1
    time.sleep(3)
    assert verify(daemon, "nobody@relay.test")["dsn"] == "5.1.1"
    assert sink.connections == 2


def test_a_result_due_for_refresh_is_given_and_probed_again_in_the_background(daemons, tmp_path, sink):
    daemon = callout_daemon(daemons, tmp_path, sink.port, *FIRST_ASK, "--verify-positive-refresh", "0.00001")  # 0.9 s
    assert verify(daemon, "someone@relay.test")["verdict"] == "deliverable"
    time.sleep(1)
    assert verify(daemon, "someone@relay.test")["verdict"] == "deliverable"  # at once, from the cache
    assert daemon.status()["verify"]["hits"] == 1
    wait_for(lambda: sink.connections == 2, what="the background probe")


def test_callout_rate_holds_back_the_probes_of_a_destination(daemons, tmp_path, sink):
    daemon = callout_daemon(daemons, tmp_path, sink.port, *FIRST_ASK, settings="callout=yes callout-rate=1/min")
    assert verify(daemon, "nobody@relay.test")["dsn"] == "5.1.1"
    held = verify(daemon, "other@relay.test")
    assert (held["code"], held["dsn"]) == (450, "4.1.1")
    time.sleep(1)
    assert sink.connections == 1, "the second probe waits for its turn"


def test_without_callout_the_next_hop_is_not_asked(daemons, tmp_path, sink):
    daemon = callout_daemon(daemons, tmp_path, sink.port, settings="concurrency=5")
    assert verify(daemon, "nobody@relay.test")["verdict"] == "deliverable"
    assert sink.connections == 0


def test_a_callout_to_dovecot_lmtp_refuses_its_unknown_user_and_mail_to_a_known_one_arrives(daemons, tmp_path):
    """Dovecot answers RCPT for a user it does not have with 550 5.1.1: that answer comes at RCPT
    through qrouter; its user is deliverable, and a message to it is then delivered there."""
    with DovecotLMTP(["alice"]) as dovecot:
        (tmp_path / "transports").write_text(f"store.test lmtp:{dovecot.socket}\n")
        (tmp_path / "destinations").write_text(f"lmtp:{dovecot.socket} callout=yes\n")
        daemon = daemons("--transports", str(tmp_path / "transports"),
                         "--destinations", str(tmp_path / "destinations"), *FIRST_ASK)
        refused = verify(daemon, "bob@store.test")
        assert (refused["code"], refused["dsn"]) == (550, "5.1.1")
        assert f"host unix[{dovecot.socket}] said: 550 5.1.1 <bob@store.test> User doesn't exist" in refused["text"]
        assert verify(daemon, "alice@store.test")["verdict"] == "deliverable"
        assert not dovecot.maildir("alice").exists(), "a probe delivers nothing"
        Spool(daemon.spool).enqueue("s@example.org", ["alice@store.test"], b"Subject: hi\n\nhello\n")
        [delivered] = wait_for(lambda: list((dovecot.maildir("alice") / "new").glob("*"))
                               if (dovecot.maildir("alice") / "new").exists() else [], what="delivery to Dovecot")
        assert delivered.read_bytes().endswith(b"hello\n")


def test_a_probe_takes_a_place_in_the_destination_s_window(daemons, tmp_path):
    """With concurrency=1, a probe waits while a delivery holds the one connection, and the
    delivery's next message waits while the probe does: never two connections at once."""
    with CountingSink(delay=0.5, refuse={"nobody@relay.test": UNKNOWN}) as slow:  # about 4 s a delivery
        daemon = callout_daemon(daemons, tmp_path, slow.port, "--verify-wait", "0.5",
                                settings="callout=yes concurrency=1 initial-window=1")
        Spool(daemon.spool).enqueue("s@example.org", ["x@relay.test"], b"Subject: 1\n\none\n")
        wait_for(lambda: slow.open == 1, what="the delivery's connection")
        held = verify(daemon, "nobody@relay.test")
        assert (held["code"], held["dsn"]) == (450, "4.1.1")
        Spool(daemon.spool).enqueue("s@example.org", ["y@relay.test"], b"Subject: 2\n\ntwo\n")
        wait_for(lambda: len(slow.messages) == 2 and daemon.status()["verify"]["cache"] == 1, timeout=60,
                 what="both deliveries and the probe")
        assert verify(daemon, "nobody@relay.test")["dsn"] == "5.1.1"
        assert slow.most == 1
