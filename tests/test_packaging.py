"""The shipped samples work as shipped: the config passes check-config, the systemd unit's
command lines start, reload and stop the real daemon, and the unit's user and capabilities are
exactly what local delivery needs."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from router.config import KEYS
from tests.daemon import DAEMON_USER, ROOT, Daemon, qrouter, wait_for
from tests.unix_users import BOB, owned_dir, script

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


def test_systemd_unit_gives_exactly_the_capabilities_local_delivery_needs(tmp_path, unix_users, world_dir):
    """Started as the unit starts it (its user, its ambient capabilities, nothing else in the
    bounding set), a pipe runs as another user with no capabilities, network workers hold none,
    and the supervisor holds them without using them."""
    service = unit()["Service"]
    capabilities = service["AmbientCapabilities"].split()
    assert capabilities == service["CapabilityBoundingSet"].split() == ["CAP_SETUID", "CAP_SETGID", "CAP_KILL"]
    assert (service["User"], service["Group"]) == (DAEMON_USER, DAEMON_USER)
    assert "NoNewPrivileges" not in service, "procmail and maildrop are set-group-id mail"
    names = ",".join(f"+{name.lower().removeprefix('cap_')}" for name in capabilities)
    systemd = ["setpriv", "--reuid", DAEMON_USER, "--regid", DAEMON_USER, "--init-groups", f"--inh-caps={names}",
               f"--ambient-caps={names}", f"--bounding-set=-all,{names}", sys.executable, "-m", "router"]
    (tmp_path / "spool").mkdir()
    shutil.chown(tmp_path / "spool", DAEMON_USER, DAEMON_USER)  # as the package makes /var/spool/qrouter
    out = owned_dir(world_dir, unix_users[BOB])
    robot = script(world_dir, "robot", f"cat >/dev/null; id -un > {out}/who; grep ^Cap /proc/$$/status > {out}/caps\n")
    (tmp_path / "transports").write_text(f"robot.example |user={BOB} {robot}\n")
    daemon = Daemon(tmp_path, "--transports", str(tmp_path / "transports"), workers=1, launcher=systemd).start()
    try:
        qrouter("enqueue", "--queue-dir", str(daemon.spool), "-f", "s@example.org", "r@robot.example",
                stdin=b"Subject: hi\n\nhi\n", check=True)
        wait_for(lambda: (out / "caps").exists() and (out / "caps").read_text(), what="the robot's run")
        assert (out / "who").read_text().strip() == BOB
        assert all(int(line.split()[1], 16) == 0 for line in (out / "caps").read_text().splitlines()
                   if not line.startswith("CapBnd"))
        held = {}
        for worker in [{"pool": "supervisor", "pid": daemon.status()["pid"]}, *daemon.status()["workers"]]:
            status = dict(line.split(":\t") for line in Path(f"/proc/{worker['pid']}/status").read_text().splitlines())
            held[worker["pool"]] = (int(status["CapEff"], 16), int(status["CapPrm"], 16), int(status["CapAmb"], 16))
        assert held == {"supervisor": (0, 0xE0, 0), "network": (0, 0, 0), "local": (0xE0, 0xE0, 0)}
    finally:
        daemon.stop()


def test_the_suite_as_a_normal_user_refuses_once_and_says_what_to_run():
    """Every test needs root (users, mounts, the daemon started as init starts it): as anyone
    else, one refusal naming the command, not a setup error per test."""
    as_nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--"]
    make = subprocess.run([*as_nobody, "make", "-s", "-C", str(ROOT), "test"], capture_output=True, timeout=60)
    assert make.returncode != 0, make
    assert make.stdout.decode().splitlines() == ["make test needs root: the suite creates unix users, mounts small "
                                                 "filesystems and starts the daemon as root; run: sudo make test"]
    pytest = subprocess.run([*as_nobody, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                             "tests/test_address.py"], capture_output=True, timeout=60, cwd=ROOT)
    out = pytest.stdout.decode() + pytest.stderr.decode()
    assert pytest.returncode == 4 and "run: sudo make test" in out and "error" not in out.lower(), out


def test_the_man_pages_are_those_the_key_table_and_the_commands_make(tmp_path):
    """qrouter(8) and qrouter.conf(5) are generated (packaging/man/generate.py): the pages in the
    tree are what it makes now, so a key or a command cannot be added without them."""
    subprocess.run([sys.executable, str(PACKAGING / "man" / "generate.py"), str(tmp_path)], check=True, timeout=60)
    for page in ("qrouter.8", "qrouter.conf.5"):
        assert (tmp_path / page).read_bytes() == (PACKAGING / "man" / page).read_bytes(), \
            f"packaging/man/{page} is stale: run python packaging/man/generate.py"
    shown = subprocess.run(["man", "-l", str(tmp_path / "qrouter.conf.5")], capture_output=True, text=True,
                           env={"MANWIDTH": "200", "PATH": "/usr/bin:/bin"}, timeout=30, check=True).stdout
    assert all(f"{key} {KEYS[key].metadata['metavar']}" in shown for key in KEYS), shown
    commands = subprocess.run(["man", "-l", str(tmp_path / "qrouter.8")], capture_output=True, text=True,
                              env={"MANWIDTH": "200", "PATH": "/usr/bin:/bin"}, timeout=30, check=True).stdout
    assert "qrouter queue flush" in commands and "qrouter check-config" in commands, commands


def test_the_wheel_installs_clean_and_the_unit_verifies(tmp_path):
    """As docs/deployment.md installs it: a wheel built from the tree, without a warning, into a
    virtualenv of its own, with its man pages; the shipped unit passes systemd-analyze verify with
    the command and the man page the install provides."""
    # PYTHONPATH out too: the build leaves qpsmtpd_router.egg-info in the tree, which pip would
    # take for the package already installed, and install its dependencies alone
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300,
                           env=environment)
    assert built.returncode == 0, built.stderr
    assert "warning" not in (built.stdout + built.stderr).lower(), built.stdout + built.stderr
    [wheel] = (tmp_path / "dist").glob("qpsmtpd_router-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], capture_output=True,
                               text=True, timeout=600, cwd=tmp_path, env=environment)
    assert installed.returncode == 0, installed.stderr
    helped = subprocess.run([str(venv / "bin" / "qrouter"), "--help"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert helped.returncode == 0 and "check-config" in helped.stdout, helped
    man = venv / "share" / "man"
    assert (man / "man8" / "qrouter.8").is_file() and (man / "man5" / "qrouter.conf.5").is_file()
    text = (PACKAGING / "systemd" / "qrouter.service").read_text()
    assert "ExecStart=/usr/local/bin/qrouter run" in text  # where docs/deployment.md links it
    unit = tmp_path / "qrouter.service"
    unit.write_text(text.replace("/usr/local/bin/qrouter", str(venv / "bin" / "qrouter")))
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "MANPATH": str(man)})
    assert verified.returncode == 0 and "qrouter.service" not in verified.stdout + verified.stderr, verified
