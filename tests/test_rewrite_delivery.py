"""Address rewriting through the real daemon: envelope always, headers with rewrite-both, once."""

from __future__ import annotations

import os
import signal
import time

from router.spool import Spool
from router.spool.queue_file import parse
from tests.daemon import message_in, qrouter, wait_for

RULES = "from *.servers.company.foo company.foo\nto /.*\\.foo\\.bar/ foo.bar\n"
MESSAGE = (b'From: "Host, One" <root@host1.servers.company.foo>\n'
           b"To: user@x.foo.bar (the user), =?utf-8?q?B=C3=B6b?= <bob@y.foo.bar>\n"
           b"Reply-To: root@host1.servers.company.foo\n"
           b"Subject: report\n\nTo: user@x.foo.bar in the body stays\n")


def test_envelope_rewritten_headers_untouched_without_rewrite_both(daemons, tmp_path):
    (tmp_path / "rewriting").write_text(RULES)
    daemon = daemons("--rewriting", str(tmp_path / "rewriting"))
    queue_id = Spool(daemon.spool).enqueue("root@host1.servers.company.foo", ["user@x.foo.bar"], MESSAGE)
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery")
    [delivered] = daemon.delivered("foo.bar/user")
    assert message_in(delivered) == MESSAGE
    log = daemon.log()
    assert (f"{queue_id}: from=<root@host1.servers.company.foo> rewritten to <root@company.foo> "
            f"by {tmp_path / 'rewriting'}:1") in log
    assert f"{queue_id}: to=<user@x.foo.bar> rewritten to <user@foo.bar> by {tmp_path / 'rewriting'}:2" in log
    assert f"{queue_id}: to=<user@foo.bar>, relay=maildir[" in log


def test_rewrite_both_changes_only_header_addresses(daemons, tmp_path):
    (tmp_path / "rewriting").write_text(RULES)
    daemon = daemons("--rewriting", str(tmp_path / "rewriting"), "--rewrite-both", "yes")
    Spool(daemon.spool).enqueue("root@host1.servers.company.foo", ["user@x.foo.bar"], MESSAGE)
    [delivered] = wait_for(lambda: daemon.delivered("foo.bar/user"), what="delivery")
    assert message_in(delivered) == (
        b'From: "Host, One" <root@company.foo>\n'
        b"To: user@foo.bar (the user), =?utf-8?q?B=C3=B6b?= <bob@foo.bar>\n"
        b"Reply-To: root@host1.servers.company.foo\n"
        b"Subject: report\n\nTo: user@x.foo.bar in the body stays\n")


def test_rewriting_is_applied_once_even_across_retries_and_restarts(daemons, tmp_path):
    # applied twice, b.example would become d.example: line 2 then line 1
    (tmp_path / "rewriting").write_text("to c.example d.example\nto b.example c.example\n")
    (tmp_path / "transports").write_text("c.example queue/retry 4.2.0 not now\n")
    config = tmp_path / "qrouter.conf"
    config.write_text(f"rewriting {tmp_path / 'rewriting'}\ntransports {tmp_path / 'transports'}\nmin-backoff 60\n")
    daemon = daemons("--config", str(config))
    queue_id = Spool(daemon.spool).enqueue("s@example.org", ["u@b.example"], b"once\n")
    deferred = daemon.spool / "deferred" / queue_id
    wait_for(deferred.exists, what="deferral")
    stored = parse(deferred.read_bytes(), str(deferred))
    assert stored.rewritten and stored.recipients[0].address == "u@c.example"

    daemon.stop()
    (tmp_path / "transports").write_text(f"*.example queue/maildir {daemon.mail}/%d/%u\n")
    daemon.start()
    os.utime(deferred, (time.time(), time.time()))
    daemon.signal(signal.SIGHUP)  # the supervisor learns of the new mtime through inotify either way
    [delivered] = wait_for(lambda: daemon.delivered("*/u"), what="delivery after restart")
    assert delivered.parent.parent.parent.name == "c.example"
    assert "d.example" not in daemon.log()


def test_route_command_shows_rewriting(tmp_path):
    (tmp_path / "rewriting").write_text(RULES)
    (tmp_path / "qrouter.conf").write_text("rewriting rewriting\ndefault-transport queue/discard\n")
    result = qrouter("route", "--config", str(tmp_path / "qrouter.conf"), "--from", "a@h.servers.company.foo",
                     "user@x.foo.bar", check=True)
    assert result.stdout.decode().splitlines()[:3] == [
        "recipient: user@x.foo.bar",
        f"rewritten: user@foo.bar (rewriting rule {tmp_path / 'rewriting'}:2)",
        "sender:    <a@h.servers.company.foo> rewritten to <a@company.foo> "
        f"(rewriting rule {tmp_path / 'rewriting'}:1)",
    ]


def test_bad_rewriting_file_is_refused_with_file_and_line(tmp_path):
    (tmp_path / "rewriting").write_text("from *.ok.example ok.example\nsideways a.example b.example\n")
    result = qrouter("check-config", "--rewriting", str(tmp_path / "rewriting"))
    assert result.returncode == 78
    assert f"{tmp_path / 'rewriting'}:2:".encode() in result.stderr
