"""The shipped samples work as shipped: the config passes check-config, and the systemd unit's
command lines start, reload and stop the real daemon."""

from __future__ import annotations

import configparser
import shlex
import signal
import subprocess
import sys

from router.config import KEYS
from tests.daemon import ROOT, qrouter, wait_for

PACKAGING = ROOT / "packaging"


def test_sample_config_names_every_key_and_is_valid():
    text = (PACKAGING / "config" / "qrouter.conf").read_text()
    keys_mentioned = {line.lstrip("# ").split(" ", 1)[0] for line in text.splitlines()}
    assert set(KEYS) - keys_mentioned == set()
    result = qrouter("check-config", "--config", str(PACKAGING / "config" / "qrouter.conf"))
    assert result.returncode == 0, result.stderr.decode()


def test_sample_policy_routes_as_its_comments_say():
    config = str(PACKAGING / "config" / "qrouter.conf")
    routed = qrouter("route", "--config", config, "--from", "cron@db1.servers.example.org",
                     "x@host-spl-123456.example.net", check=True).stdout.decode()
    assert "next hop:  [192.0.2.80]:2525" in routed
    assert "sender:    <cron@db1.servers.example.org> rewritten to <cron@example.org>" in routed
    retired = qrouter("route", "--config", config, "a@retired.example.org", check=True).stdout.decode()
    assert "next hop:  queue/error 5.1.6 this domain no longer takes mail" in retired


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(PACKAGING / "systemd" / "qrouter.service")
    return parser


def test_systemd_unit_runs_reloads_and_stops_the_daemon(tmp_path):
    service = unit()["Service"]
    assert (service["Type"], service["Restart"], service["KillMode"]) == ("simple", "on-failure", "mixed")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    command = shlex.split(service["ExecStart"])
    assert command[:4] == ["/usr/local/bin/qrouter", "run", "--foreground", "--log"]
    config = tmp_path / "qrouter.conf"
    config.write_text(f"queue-dir {tmp_path}/spool\nworkers 1\ndefault-transport queue/maildir {tmp_path}/mail\n")
    command = [sys.executable, "-m", "router", *command[1:]]
    command[command.index("--config") + 1] = str(config)
    command[command.index("--log") + 1] = str(tmp_path / "log")  # no syslog daemon here
    daemon = subprocess.Popen(command, cwd=ROOT)
    try:
        wait_for(lambda: (tmp_path / "log").exists() and "started:" in (tmp_path / "log").read_text(),
                 what="start")
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in (tmp_path / "log").read_text(), what="reload")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert "stopped" in (tmp_path / "log").read_text()
    assert int(service["TimeoutStopSec"].rstrip("s")) > 30, "systemd must wait longer than shutdown-timeout"
