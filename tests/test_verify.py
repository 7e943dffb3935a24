"""Recipient verification by the running daemon: `qrouter verify` and the `verify` request of
the status socket, against a real daemon with aliases, a transports file, rewriting rules and a
loopback name server for MX routing. Nothing is ever queued by a verification."""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from router.daemon.status_socket import query
from tests.daemon import qrouter, wait_for
from tests.dns_server import DNSServer
from tests.smtp_servers import free_port
from tests.test_metrics import scrape, value
from tests.unix_users import script

ZONE = """
mail          MX 10 mx1
mx1           A 127.0.0.2
nullmx        MX 0 .
slow          MX 10 mx1
warm          MX 10 mx1
"""


@pytest.fixture
def verifying(daemons, tmp_path, world_dir):
    """A daemon with local delivery through aliases for local.test, rules for blocked.test and
    later.test, a rewriting rule from old.test to local.test, and MX routing for the rest,
    asking a loopback name server (which never answers for slow.test)."""
    agent = script(world_dir, "agent", "cat >/dev/null\n")
    (tmp_path / "aliases").write_text("root nobody\nalice nobody\nbob[0-9]+ nobody\n")
    (tmp_path / "transports").write_text(
        f"local.test {agent}\n"
        "blocked.test queue/error 5.7.1 we take no mail for blocked.test\n"
        "later.test queue/retry 4.2.0 held for maintenance\n")
    (tmp_path / "rewriting").write_text("to old.test local.test\n")
    dns = DNSServer(ZONE).start()
    dns.silence("slow.test.", "MX")
    daemon = daemons("--transports", str(tmp_path / "transports"), "--aliases", str(tmp_path / "aliases"),
                     "--rewriting", str(tmp_path / "rewriting"), "--dns-servers", dns.servers,
                     "--dns-timeout", "30", "--verify-wait", "4.5", maildir=False)
    daemon.dns = dns
    yield daemon
    dns.stop()


def verify(daemon, *args: str):
    result = qrouter("verify", "--queue-dir", str(daemon.spool), *args)
    lines = result.stdout.decode().splitlines()
    assert len(lines) <= 1, lines
    return result.returncode, lines[0] if lines else result.stderr.decode()


def warm_up(daemon) -> None:
    """Wait for a first DNS verdict that is not 'temporary': a fresh daemon's worker loads the DNS
    library on first use, which under load may take longer than verify-wait. Counts a deliverable."""
    socket_path = str(daemon.spool / "status.sock")
    wait_for(lambda: query(socket_path, {"command": "verify", "recipient": "u@warm.test"})["verdict"] != "temporary",
             timeout=60, what="a first DNS verdict")


@pytest.mark.parametrize(("address", "code", "reply"), [
    ("alice@local.test", 0, "250 2.1.5 deliverable: transports rule"),
    ("bob42@local.test", 0, "250 2.1.5 deliverable: transports rule"),  # a regex alias
    ("alice@old.test", 0, "250 2.1.5 deliverable: transports rule"),  # rewritten to local.test first
    ("carol@local.test", 1, "550 5.1.1 no alias for local part 'carol' in"),
    ("bob@local.test", 1, "550 5.1.1 no alias for local part 'bob' in"),
    ("carol@old.test", 1, "550 5.1.1 no alias for local part 'carol' in"),
    ("anyone@blocked.test", 1, "550 5.7.1 we take no mail for blocked.test"),
    ("anyone@later.test", 75, "450 4.2.0 held for maintenance"),
    ("user@mail.test", 0, "250 2.1.5 deliverable: MX routing for mail.test"),
    ("user@nullmx.test", 1, "550 5.1.10 "),
    ("user@nowhere.test", 1, "550 5.1.2 "),
], ids=["alias", "regex-alias", "rewritten-alias", "unknown-user", "regex-needs-digits", "rewritten-unknown",
        "queue-error", "queue-retry", "mx", "null-mx", "no-such-domain"])
def test_verify_gives_the_verdict_delivery_would_reach(verifying, address, code, reply):
    warm_up(verifying)
    assert verify(verifying, address, "--sender", "someone@example.net")[:1] == (code,)
    assert verify(verifying, address)[1].startswith(reply)
    assert verifying.files("incoming") == [] and verifying.files("deferred") == []


def test_verdicts_are_counted_and_nothing_is_queued_or_logged_per_request(verifying):
    for address in ["alice@local.test", "carol@local.test", "dave@local.test", "anyone@later.test"]:
        qrouter("verify", "--queue-dir", str(verifying.spool), address)
    counts = verifying.status()["verify"]
    assert (counts["deliverable"], counts["refused"], counts["temporary"]) == (1, 2, 1)
    shown = qrouter("status", "--queue-dir", str(verifying.spool), check=True).stdout.decode()
    assert "recipients verified since start: 1 deliverable, 2 refused, 1 temporary" in shown
    assert "callout results kept: 0; from there since start: 0 of 0 (hit rate -)" in shown
    assert "carol" not in verifying.log()
    for queue in ("incoming", "active", "deferred", "hold"):
        assert verifying.files(queue) == []


def test_a_dns_question_never_holds_up_the_daemon_and_ends_in_a_temporary_verdict(verifying):
    """slow.test's name server never answers: its verdict waits for a worker's lookup, while the
    daemon goes on answering (status, policy verdicts); at the socket's deadline it is 4.4.3."""
    answers: dict[str, dict] = {}
    socket_path = str(verifying.spool / "status.sock")

    def ask_slow() -> None:
        answers["slow"] = query(socket_path, {"command": "verify", "recipient": "u@slow.test"}, timeout=60)

    warm_up(verifying)
    asking = threading.Thread(target=ask_slow)
    asking.start()
    wait_for(lambda: any(q.name == "slow.test" for q in verifying.dns.queries), what="the lookup of slow.test")
    local = query(socket_path, {"command": "verify", "recipient": "carol@local.test"})
    assert local["dsn"] == "5.1.1"
    assert "slow" not in answers, "the DNS question was answered before the daemon answered others"
    asking.join(60)
    assert answers["slow"]["verdict"] == "temporary" and answers["slow"]["dsn"] == "4.4.3"
    assert verify(verifying, "u@slow.test")[0] == 75


def test_clients_asking_about_one_domain_at_once_each_get_its_dns_verdict(daemons):
    with DNSServer(ZONE) as dns:
        daemon = daemons("--dns-servers", dns.servers, "--verify-wait", "4.5", maildir=False)
        warm_up(daemon)  # a deliverable: the count asserted is of refused
        socket_path = str(daemon.spool / "status.sock")
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda n: query(socket_path, {"command": "verify",
                                                                  "recipient": f"u{n}@nowhere.test"}), range(10)))
        assert [r["dsn"] for r in results] == ["5.1.2"] * 10
        assert [r["recipient"] for r in results] == [f"u{n}@nowhere.test" for n in range(10)]
        assert daemon.status()["verify"]["refused"] == 10


def raw_request(path: str, data: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)
        client.connect(path)
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return json.loads(answer)


@pytest.mark.parametrize(("request_line", "error"), [
    (b'{"command": "verify"}', "'recipient' must be an address"),
    (b'{"command": "verify", "recipient": 7}', "'recipient' must be an address"),
    (b'{"command": "verify", "recipient": "a@local.test\\r\\nRSET"}', "contains CR, LF or NUL"),
    (b'{"command": "verify", "recipient": "a@local.test", "sender": "x\\ny@z.test"}', "contains CR, LF or NUL"),
    (b'{"command": "verify", "recipient": "\\udcff@local.test"}', "not valid UTF-8"),
    (b'{"command": "verify", "recipient": "no-domain"}', "has no local part and domain"),
    (b'{"command": "verify", "recipient": "' + b"a" * (4 << 20) + b'@local.test"}', "longer than 1000 characters"),
    (b'{"command": "verify", "recipient": "\xff\xfe@local.test"}', "bad request"),
], ids=["missing", "not-a-string", "cr-lf", "cr-lf-sender", "surrogate", "no-domain", "huge", "not-utf-8"])
def test_hostile_verify_requests_are_refused_and_the_daemon_goes_on(verifying, request_line, error):
    path = str(verifying.spool / "status.sock")
    answer = raw_request(path, request_line + b"\n")
    assert error in answer["error"] and answer["error"].startswith("bad request")
    assert len(json.dumps(answer)) < 2000, "the answer does not echo a huge request back"
    assert query(path, {"command": "verify", "recipient": "carol@local.test"})["dsn"] == "5.1.1"
    assert verifying.process.poll() is None


def test_verify_without_a_daemon_exits_75(tmp_path):
    result = qrouter("verify", "--queue-dir", str(tmp_path), "alice@local.test")
    assert result.returncode == 75 and b"cannot reach the daemon" in result.stderr


def test_verify_refuses_a_bad_address_before_asking(tmp_path):
    result = qrouter("verify", "--queue-dir", str(tmp_path), "not an address")
    assert result.returncode == 64


def test_a_reload_changes_the_verdict(verifying, tmp_path):
    assert verify(verifying, "carol@local.test")[0] == 1
    (tmp_path / "aliases").write_text("root nobody\nalice nobody\ncarol nobody\n")
    verifying.signal(1)
    wait_for(lambda: "reloaded" in verifying.log())
    assert verify(verifying, "carol@local.test")[0] == 0


def test_verdicts_are_counted_in_the_metrics(daemons, tmp_path):
    port = free_port()
    (tmp_path / "transports").write_text("blocked.test queue/error 5.7.1 no\n")
    daemon = daemons("--metrics-listen", f"127.0.0.1:{port}", "--transports", str(tmp_path / "transports"))
    socket_path = str(daemon.spool / "status.sock")
    for recipient in ["a@blocked.test", "b@blocked.test", "c@example.org"]:
        query(socket_path, {"command": "verify", "recipient": recipient})
    families, _ = scrape(f"127.0.0.1:{port}")
    assert value(families, "qrouter_recipient_verifications_total", verdict="refused") == 2
    assert value(families, "qrouter_recipient_verifications_total", verdict="deliverable") == 1
    assert value(families, "qrouter_recipient_verifications_total", verdict="temporary") == 0
