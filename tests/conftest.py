from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon import DAEMON_USER, Daemon, reachable
from tests.qpsmtpd_server import QROUTER, QpsmtpdServer, stop_daemon
from tests.unix_users import unix_users, world_dir  # noqa: F401  (fixtures for every test module)

# aiosmtpd gives a server it starts 5 s to come up and answer itself: on a loaded machine, more
os.environ.setdefault("AIOSMTPD_CONTROLLER_TIMEOUT", "30")


@pytest.fixture
def daemons(tmp_path):
    """Make daemons with `daemons(*args)`; every one still running is stopped after the test.
    They share tmp_path's spool, unless `home` names a directory of their own in it."""
    started: list[Daemon] = []

    def make(*args: str, workers: int = 2, start: bool = True, home: str = "", **kwargs) -> Daemon:
        place = tmp_path / home
        if home:
            place.mkdir()
            place.chmod(0o1777)  # for the daemon's user, as tmp_path itself is
        daemon = Daemon(place, *args, workers=workers, **kwargs)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        if daemon.process is not None and daemon.process.poll() is None:
            try:  # as an init system stops it: it ends as a daemon does (and coverage is saved)
                daemon.stop(timeout=2)
            except subprocess.TimeoutExpired:  # busy past that: the test is over, kill it
                daemon.kill()


@pytest.fixture
def qpsmtpd(tmp_path):
    """`qpsmtpd(spool, *plugin_args)` makes a qpsmtpd whose plugin line is `queue/router qrouter
    QROUTER queue-dir SPOOL ARGS`, plus `no-daemon 1` if not own_daemon; without spool_on_line
    the spool comes from a config file in ARGS. Every server is stopped after the test, and so is
    every daemon the plugin started (found by SPOOL/qrouter.pid)."""
    servers: list[QpsmtpdServer] = []
    plugin_spools: list[Path] = []

    def make(spool: Path, *plugin_args: str, own_daemon: bool = True, start: bool = True,
             spool_on_line: bool = True, config: dict[str, str] | None = None) -> QpsmtpdServer:
        args = ["qrouter", QROUTER, *(["queue-dir", str(spool)] if spool_on_line else []), *plugin_args]
        if not own_daemon:
            args += ["no-daemon", "1"]
        server = QpsmtpdServer(tmp_path / f"qpsmtpd{len(servers)}", args, config=config)
        servers.append(server)
        if own_daemon:
            plugin_spools.append(spool)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()
    for spool in plugin_spools:
        stop_daemon(spool)


NOT_ROOT = ("the tests run as root: they create unix users, mount small filesystems and start the daemon "
            "as root, as init does; run: sudo make test")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Said once, before any test: as anyone else every test would fail in its setup."""
    if os.geteuid() != 0:
        pytest.exit(NOT_ROOT, returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session", autouse=True)
def daemon_user() -> str:
    """The unprivileged user the daemon becomes when a test starts it as root (the tests run as
    root: they install packages, mount filesystems and create users), made as a package would."""
    if subprocess.run(["id", DAEMON_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                        DAEMON_USER], check=True)
    # as docs/deployment.md sets it up: Maildirs under /var/mail (root:mail 2775) are written as it
    subprocess.run(["usermod", "-aG", "mail", DAEMON_USER], check=True)
    probe = subprocess.run(["setpriv", "--reuid", DAEMON_USER, "--regid", DAEMON_USER, "--clear-groups",
                            sys.executable, "-c", "import encodings.idna"], capture_output=True)
    if probe.returncode != 0:
        pytest.fail(f"user {DAEMON_USER} cannot run {sys.executable} ({probe.stderr.decode().strip()}): "
                    "run `make run-as-root` (make test does)")
    return DAEMON_USER


@pytest.fixture(autouse=True)
def daemon_user_reaches(tmp_path):
    """A daemon a test starts becomes user qrouter: it must reach the test's directory and write
    its spool and Maildirs there, as in /var/spool and /var/mail."""
    reachable(tmp_path, 0o1777)


@pytest.fixture
def open_files() -> Iterator[Callable[[int], None]]:
    """open_files(count): room for `count` open files in this process and in the daemons the
    test starts afterwards, which inherit the limit (idle clients by the thousand); restored
    after the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def room(count: int) -> None:
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < count:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(count, hard), hard))

    yield room
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Captured output as UTF-8 that can be sent: the suite's worker processes report to the
    main one in UTF-8, and the log tests write lone surrogates on purpose (an address's bytes
    that are no UTF-8), which would otherwise end the whole run."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [(title, text.encode("utf-8", "backslashreplace").decode())
                       for title, text in report.sections]
