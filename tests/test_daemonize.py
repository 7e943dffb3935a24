"""`qrouter run` without --foreground: returns once the daemon serves, or fails with the reason."""

from __future__ import annotations

import os
import signal

import psutil

from router.spool import Spool
from tests.daemon import qrouter, wait_for


def test_background_daemon_serves_and_stops(tmp_path):
    spool, mail, log = tmp_path / "spool", tmp_path / "mail", tmp_path / "qrouter.log"
    args = ["run", "--queue-dir", str(spool), "--workers", "1", "--log", str(log),
            "--default-transport", f"queue/maildir {mail}/%d/%u", "--send-ndr", "yes"]
    result = qrouter(*args)
    assert result.returncode == 0, result.stderr
    pid = int((spool / "qrouter.pid").read_text())
    try:
        assert psutil.pid_exists(pid)
        assert os.getsid(pid) != os.getsid(0), "the daemon did not leave the caller's session"
        Spool(spool).enqueue("a@example.org", ["u@example.org"], b"background\n")
        wait_for(lambda: list((mail / "example.org" / "u" / "new").glob("*")) if (mail / "example.org").exists()
                 else [], what="delivery")

        second = qrouter(*args)
        assert second.returncode == 1
        assert f"is in use by qrouter pid {pid}".encode() in second.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
             what="daemon exit")
    assert "stopped" in log.read_text()
