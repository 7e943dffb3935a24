"""Enqueue to Maildir delivery through the real daemon, byte for byte."""

from __future__ import annotations

import json
import os

import pytest

from router.spool import Spool
from tests.daemon import message_in, qrouter, wait_for

BODIES = {
    "plain": b"Subject: plain\n\nhello\n",
    "crlf": b"Subject: crlf\r\n\r\nline one\r\n.dot line\r\n",
    "eight-bit": "Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\n\nGr\u00fc\u00dfe aus K\u00f6ln \u2603\n".encode(),
    "binary": bytes(range(256)) * 64,
    "long-line": b"Subject: long\n\n" + b"x" * 1_000_000 + b"\n",
    "no-final-newline": b"Subject: x\n\nno newline at the end",
}


@pytest.mark.parametrize("name", BODIES)
def test_message_arrives_byte_for_byte(daemons, name):
    daemon = daemons()
    result = qrouter("enqueue", "--queue-dir", str(daemon.spool), "-f", "sender@example.org",
                     "user@example.org", stdin=BODIES[name], check=True)
    queue_id = result.stdout.decode().strip()
    delivered = wait_for(lambda: daemon.delivered("example.org/user"), what="delivery")
    [content] = [message_in(p) for p in delivered]
    assert content.startswith(b"Received: by ") and content.endswith(BODIES[name])  # after qrouter's trace
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="removal")
    assert daemon.files("incoming") == daemon.files("active") == daemon.files("deferred") == []
    line = next(ln for ln in daemon.log().splitlines() if f"{queue_id}: to=<user@example.org>" in ln)
    assert "relay=maildir[" in line and "dsn=2.0.0, status=sent (delivered to maildir as " in line
    assert "attempts=1" in line and "delay=" in line


def test_each_recipient_gets_its_own_maildir(daemons):
    daemon = daemons()
    spool = Spool(daemon.spool)
    spool.enqueue("<>", ["a@one.example", "B@Two.Example", '"../../etc"@one.example'], b"Subject: x\n\nbody\n")
    wait_for(lambda: len(daemon.delivered()) == 3, what="three deliveries")
    folders = sorted(str(p.parent.parent.relative_to(daemon.mail)) for p in daemon.delivered())
    assert folders == ["one.example/%22..%2F..%2Fetc%22", "one.example/a", "two.example/B"]
    assert not (daemon.tmp / "etc").exists()


def test_message_queued_before_start_is_delivered_at_start(daemons, tmp_path):
    daemon = daemons(start=False)
    spool = Spool(daemon.spool)
    spool.create()
    ids = [spool.enqueue("a@example.org", [f"u{i}@example.org"], f"n={i}\n".encode()) for i in range(20)]
    daemon.start()
    wait_for(lambda: len(daemon.delivered()) == 20, what="20 deliveries")
    assert sorted(message_in(p) for p in daemon.delivered()) == sorted(f"n={i}\n".encode() for i in range(20))
    # the Maildir file comes before the "removed" line: with deliveries side by side, wait for it
    wait_for(lambda: all(f"{queue_id}: removed" in daemon.log() for queue_id in ids), what="20 removed")


def test_status_reports_queues_workers_and_counters(daemons):
    daemon = daemons(workers=3)
    Spool(daemon.spool).enqueue("a@example.org", ["u@example.org"], b"x\n")
    wait_for(lambda: daemon.delivered(), what="delivery")
    wait_for(lambda: daemon.status()["counters"]["sent"] == 1, what="counters")
    status = json.loads(qrouter("status", "--json", "--queue-dir", str(daemon.spool), check=True).stdout)
    assert status["counters"]["sent"] == 1 and len(status["workers"]) == 3
    assert all(w["rss"] > 1_000_000 and w["state"] == "idle" for w in status["workers"])
    assert sum(w["done"] for w in status["workers"]) == 1
    assert status["queues"]["incoming"] == {"messages": 0, "oldest": None}
    text = qrouter("status", "--queue-dir", str(daemon.spool), check=True).stdout.decode()
    assert "since start: 1 sent, 0 deferred, 0 bounced" in text
    assert oct(os.stat(daemon.spool / "status.sock").st_mode & 0o777) == "0o660"


def test_status_without_daemon_fails_clearly(tmp_path):
    result = qrouter("status", "--queue-dir", str(tmp_path))
    assert result.returncode == 75
    assert b"cannot reach the daemon" in result.stderr


def test_queue_file_whose_id_differs_from_its_name_goes_to_corrupt(daemons):
    daemon = daemons(start=False)
    spool = Spool(daemon.spool)
    spool.create()
    queue_id = spool.enqueue("a@example.org", ["u@example.org"], b"x\n")
    other = "0000000000001-1-1"
    os.rename(daemon.spool / "incoming" / queue_id, daemon.spool / "incoming" / other)
    daemon.start()
    wait_for(lambda: daemon.files("corrupt") == [other], what="the file in corrupt/")
    # the line is logged once the move is done: the file can be there before the line is
    wait_for(lambda: f"its id line says {queue_id}, not its file name" in daemon.log(), what="the reason logged")
    assert not daemon.delivered()


def test_a_maildir_base_the_daemon_user_cannot_write_is_named_with_the_user(daemons, tmp_path):
    """As /var/mail (root:mail 2775) for a daemon user outside group mail: check-config and the
    start say so, and each deferral names the user that was refused."""
    base = tmp_path / "mailroot"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)  # root's, as the test runs as root
    template = f"queue/maildir {base}/%d/%u"
    checked = qrouter("check-config", "--queue-dir", str(tmp_path / "spool"), "--default-transport", template)
    problem = (f"default-transport: Maildirs under {base}: user qrouter cannot make directories in {base} "
               "(root:root 755), and delivers as that user: its mail would be deferred")
    assert checked.returncode == 78 and checked.stderr.decode() == f"qrouter: {problem}\n", checked
    daemon = daemons("--default-transport", template, "--min-backoff", "600")
    assert f"warning: {problem}" in daemon.log()
    queue_id = Spool(daemon.spool).enqueue("a@example.org", ["u@example.org"], b"Subject: x\n\nx\n")
    wait_for(lambda: f"{queue_id}: to=<u@example.org>" in daemon.log(), what="the attempt")
    assert (f"status=deferred (cannot deliver to Maildir: Permission denied: {base}/example.org "
            "(as user qrouter))") in daemon.log(), daemon.log()
