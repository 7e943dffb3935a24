"""Starting on a full spool: only delivery frees space, so the daemon must start and deliver even
when it cannot write its pid file or make its status socket, and still be the only one.

The spool is a real full file system: a 1 MB tmpfs with few inodes, mounted in a mount namespace
of its own that a sleeping process holds; the test reaches it through /proc/PID/root and runs
daemons in it with nsenter. It vanishes with the last process in it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from router.spool import Spool
from tests.daemon import ROOT, message_in, wait_for
from tests.test_bad_input import fill, mounted_under

MESSAGE = b"Subject: full\n\nqueued before the disk filled up\n"
NO_SPACE = "No space left on device"


@contextmanager
def private_tmpfs(mount_point: Path) -> Iterator[int]:
    """A 1 MB tmpfs with 32 inodes at `mount_point`, seen only by the process whose pid this
    yields and by what joins its mount namespace."""
    script = 'mount -t tmpfs -o size=1m,nr_inodes=32 qrouter-test "$0" && echo mounted && exec sleep 600'
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(mount_point)],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"mounted\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def use_up_inodes(directory: Path) -> list[Path]:
    """Create empty files until the file system has no inode left."""
    made: list[Path] = []
    try:
        while True:
            made.append(directory / f"inode-{len(made)}")
            made[-1].touch()
    except OSError as exc:
        assert NO_SPACE in str(exc), exc
    return made[:-1]


def warnings_naming(log: str, path: Path) -> list[str]:
    return [line for line in log.splitlines() if "warning: " in line and str(path) in line]


@pytest.mark.parametrize("pid_file", ["missing", "empty"])
def test_daemon_starts_on_a_full_spool_delivers_and_stays_the_only_one(daemons, tmp_path, pid_file):
    """"missing": no inode for the pid file, nor for the socket; "empty": the pid file is there
    but there is no room for the pid."""
    (tmp_path / "spool").mkdir()
    with private_tmpfs(tmp_path / "spool") as holder:
        launcher = ["nsenter", f"--target={holder}", "--mount", f"--wd={ROOT}", "--", sys.executable, "-m", "router"]
        daemon = daemons(workers=1, launcher=launcher, start=False)
        spool_path = daemon.spool
        inside = Path(f"/proc/{holder}/root") / spool_path.relative_to("/")
        spool = Spool(inside)
        spool.create()
        queue_id = spool.enqueue("a@example.org", ["u@example.org"], MESSAGE)
        if pid_file == "empty":
            (inside / "qrouter.pid").touch()
        fillers = [fill(inside), *use_up_inodes(inside)]

        daemon.start()
        log = daemon.log()
        pid_warnings = warnings_naming(log, spool_path / "qrouter.pid")
        socket_warnings = warnings_naming(log, spool_path / "status.sock")
        assert len(pid_warnings) == 1 and NO_SPACE in pid_warnings[0], log
        assert len(socket_warnings) == 1 and NO_SPACE in socket_warnings[0], log

        delivered = wait_for(lambda: daemon.delivered("example.org/u"), what="delivery from the full spool")
        assert [message_in(p) for p in delivered] == [MESSAGE]
        wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="removal")

        status = subprocess.run([*launcher, "status", "--queue-dir", str(spool_path)], capture_output=True,
                                cwd=ROOT, timeout=30)
        assert status.returncode == 75
        assert b"the daemon is not running or its status socket is unavailable" in status.stderr
        assert b"see the log" in status.stderr

        for filler in fillers:  # room again: a second daemon could now write everything it wants
            filler.unlink()
        second = daemons(workers=1, launcher=launcher, start=False)
        second.start(wait=False)
        assert second.process.wait(30) == 1
        assert f"cannot start: spool {spool_path} is in use by qrouter pid" in daemon.log()
        assert daemon.log().count("started:") == 1
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
    assert not mounted_under(tmp_path / "spool")
