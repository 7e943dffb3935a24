"""Logs are never dropped: `qrouter run` in the background without a `log` key and without a
syslog socket (/dev/log) logs to QUEUE-DIR/log/qrouter.log, says so before detaching, follows a
log rotation and shows the file in `qrouter status`."""

from __future__ import annotations

import json
import os
import signal
import stat

import psutil

from router.logs import target as log_module
from router.spool import Spool
from tests.daemon import qrouter, wait_for


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
             what="daemon exit")


def _delivered(mail, user: str) -> list:
    new = mail / "example.org" / user / "new"
    return list(new.glob("*")) if new.exists() else []


def test_daemon_without_syslog_logs_to_a_file_in_the_spool(tmp_path):
    # This must be the no-syslog case for real: never skip, say why it cannot run instead.
    assert not os.path.exists(log_module.SYSLOG_SOCKET), (
        f"{log_module.SYSLOG_SOCKET} exists on this machine: this test needs a host without a syslog socket")
    spool, mail = tmp_path / "spool", tmp_path / "mail"
    log_dir, log = spool / "log", spool / "log" / "qrouter.log"
    result = qrouter("run", "--queue-dir", str(spool), "--workers", "1",
                     "--default-transport", f"queue/maildir {mail}/%d/%u")
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode() == f"qrouter: no syslog (/dev/log); logging to {log}\n"
    pid = int((spool / "qrouter.pid").read_text())
    try:
        assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        wait_for(lambda: "started:" in log.read_text(), what="the started: line in the log file")
        assert f"warning: no syslog (/dev/log), logging to {log}" in log.read_text()

        queue_id = Spool(spool).enqueue("a@example.org", ["u@example.org"], b"first\n")
        wait_for(lambda: f"{queue_id}: to=<u@example.org>" in log.read_text(), what="the delivery line")
        assert "status=sent" in log.read_text()

        status = json.loads(qrouter("status", "--json", "--queue-dir", str(spool), check=True).stdout)
        assert status["log"] == str(log)

        # logrotate: the file is moved away; the supervisor is told (SIGUSR1) as its postrotate
        # says, the worker notices by itself; nothing more goes to the old file.
        log.rename(log_dir / "qrouter.log.1")
        os.kill(pid, signal.SIGUSR1)
        queue_id = Spool(spool).enqueue("a@example.org", ["v@example.org"], b"second\n")
        wait_for(lambda: _delivered(mail, "v"), what="the second delivery")
        wait_for(lambda: log.exists() and f"{queue_id}: to=<v@example.org>" in log.read_text(),
                 what="the delivery line in the new log file")
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        assert psutil.pid_exists(pid), "SIGUSR1 killed the daemon"
    finally:
        _stop(pid)
    assert "stopped" in log.read_text()
    assert "v@example.org" not in (log_dir / "qrouter.log.1").read_text()
    assert "stopped" not in (log_dir / "qrouter.log.1").read_text()


def test_daemon_refuses_to_start_when_the_fallback_log_cannot_be_written(tmp_path):
    """Better no daemon than a daemon nobody hears: the reason is said before detaching, exit 1."""
    assert not os.path.exists(log_module.SYSLOG_SOCKET), (
        f"{log_module.SYSLOG_SOCKET} exists on this machine: this test needs a host without a syslog socket")
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "log").write_text("not a directory\n")
    result = qrouter("run", "--queue-dir", str(spool), "--workers", "1")
    assert result.returncode == 1, result.stderr
    assert f"no syslog (/dev/log) and cannot write {spool}/log/qrouter.log".encode() in result.stderr
    assert not (spool / "qrouter.pid").exists()
