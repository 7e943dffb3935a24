"""Temporary failures, retries with backoff, permanent failures, expiry and archiving."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import pytest

from router.config import load
from router.spool import Spool
from router.spool.queue_file import DELIVERED, FAILED, PENDING, parse
from tests.daemon import DAEMON_USER, contents, message_in, wait_for


def read(path) -> object:
    return parse(path.read_bytes(), str(path))


def test_backoff_doubles_from_min_to_max():
    config = load(None, {"min-backoff": "300", "max-backoff": "4000"})
    assert [config.backoff(n) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]


def test_temporary_failure_defers_with_backoff_then_reload_delivers(daemons, tmp_path):
    config = tmp_path / "qrouter.conf"
    config.write_text("default-transport queue/retry 4.7.1 greylisted, come back later\nmin-backoff 60\n")
    daemon = daemons("--config", str(config))
    queue_id = Spool(daemon.spool).enqueue("a@example.org", ["u@example.org"], b"Subject: later\n\nbody\n")
    deferred = daemon.spool / "deferred" / queue_id
    wait_for(deferred.exists, what="the message in deferred/")
    started = time.time()
    assert 50 < os.stat(deferred).st_mtime - started <= 60
    line = next(ln for ln in daemon.log().splitlines() if f"{queue_id}: to=<u@example.org>" in ln)
    assert "dsn=4.7.1, status=deferred (greylisted, come back later)" in line
    stored = read(deferred)
    assert stored.attempts == 1 and stored.recipients[0].state == PENDING
    assert stored.recipients[0].reply == "greylisted, come back later"
    time.sleep(1)
    assert deferred.exists() and not daemon.delivered()

    # fix the policy and reload; the retry schedule is not touched, so make it due now
    config.write_text(f"default-transport queue/maildir {daemon.mail}/%d/%u\nmin-backoff 60\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in daemon.log(), what="reload")
    daemon.wait_idle()  # the attempt reported: until then the supervisor goes by the worker's word, not the file
    os.utime(deferred, (time.time(), time.time()))
    delivered = wait_for(lambda: daemon.delivered("example.org/u"), what="delivery after reload")
    assert message_in(delivered[0]) == b"Subject: later\n\nbody\n"
    wait_for(lambda: re.search(r", dsn=2\.0\.0, status=sent \(.*\), attempts=2$", daemon.log(), re.MULTILINE),
             what="the line logged after the delivery")
    wait_for(lambda: not deferred.exists(), what="removal from deferred/")


def test_retries_repeat_with_doubling_backoff(daemons):
    daemon = daemons("--default-transport", "queue/retry", "--min-backoff", "0.3", "--max-backoff", "0.6")
    queue_id = Spool(daemon.spool).enqueue("a@example.org", ["u@example.org"], b"x\n")
    wait_for(lambda: ", attempts=4\n" in daemon.log(), timeout=10, what="four attempts")
    waits = [float(ln.rsplit("next attempt in ", 1)[1].rstrip("s"))
             for ln in daemon.log().splitlines() if f"{queue_id}: deferred" in ln]
    assert waits[:3] == pytest.approx([0.3, 0.6, 0.6], abs=0.15)  # the wait logged is from a later now


def test_partial_success_keeps_only_pending_recipients(daemons):
    daemon = daemons("--min-backoff", "0.5")
    daemon.mail.mkdir()
    (daemon.mail / "example.org").mkdir()
    shutil.chown(daemon.mail / "example.org", DAEMON_USER)  # the daemon delivers as its user
    (daemon.mail / "example.org" / "blocked").write_text("a file where the Maildir should be\n")
    queue_id = Spool(daemon.spool).enqueue("a@example.org", ["ok@example.org", "blocked@example.org"], b"m\n")
    deferred = daemon.spool / "deferred" / queue_id
    stored = parse(wait_for(lambda: contents(deferred), what="deferral"))
    assert [(r.address, r.state) for r in stored.recipients] == [
        ("ok@example.org", DELIVERED), ("blocked@example.org", PENDING)]
    assert stored.recipients[1].dsn.startswith("4.")
    assert len(daemon.delivered("example.org/ok")) == 1
    (daemon.mail / "example.org" / "blocked").unlink()
    wait_for(lambda: daemon.delivered("example.org/blocked"), what="retry delivery")
    wait_for(lambda: not deferred.exists(), what="removal")
    assert len(daemon.delivered("example.org/ok")) == 1, "the delivered recipient got a second copy"
    assert daemon.log().count("to=<ok@example.org>") == 1


def test_permanent_failure_removes_the_message(daemons):
    daemon = daemons("--default-transport", "queue/error 5.7.1 no mail for you")
    queue_id = Spool(daemon.spool).enqueue("a@example.org", ["u@example.org"], b"x\n")
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="removal")
    assert f"{queue_id}: to=<u@example.org>, relay=none" in daemon.log()
    assert "dsn=5.7.1, status=bounced (no mail for you)" in daemon.log()
    assert daemon.files("deferred") == daemon.files("archive") == []


def test_permanent_failure_is_archived_with_final_state(daemons):
    daemon = daemons("--default-transport", "queue/error", "--archive-failed", "yes")
    queue_id = Spool(daemon.spool).enqueue("a@example.org", ["u@example.org"], b"keep me\n")
    archived = daemon.spool / "archive" / queue_id
    wait_for(archived.exists, what="archiving")
    stored = read(archived)
    assert stored.recipients[0].state == FAILED and stored.recipients[0].dsn == "5.0.0"
    assert stored.message == b"keep me\n"
    wait_for(lambda: f"{queue_id}: archived" in daemon.log(), what="the log line")  # written after the rename


def test_max_age_expires_a_message_that_keeps_failing(daemons):
    # 0.00005 days is 4.3 seconds: room for three attempts 0.3 s apart on a loaded machine
    daemon = daemons("--default-transport", "queue/retry", "--max-age", "0.00005", "--min-backoff", "0.3",
                     "--max-backoff", "0.3", "--archive-failed", "on")
    queue_id = Spool(daemon.spool).enqueue("a@example.org", ["u@example.org"], b"x\n")
    archived = daemon.spool / "archive" / queue_id
    wait_for(archived.exists, timeout=20, what="expiry")
    wait_for(lambda: "status=expired (message expired after 5e-05 days in the queue; last error:" in daemon.log(),
             what="the expiry logged")
    stored = read(archived)
    assert stored.recipients[0].state == FAILED and stored.recipients[0].dsn == "4.4.7"
    assert stored.attempts >= 3


def test_max_age_without_archive_removes(daemons):
    daemon = daemons("--default-transport", "queue/retry", "--max-age", "0")
    queue_id = Spool(daemon.spool).enqueue("a@example.org", ["u@example.org"], b"x\n")
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="expiry")
    assert "status=expired" in daemon.log()
    assert daemon.files("deferred") == daemon.files("archive") == []
