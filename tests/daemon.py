"""Helpers to run the real daemon as a subprocess and watch what it does to the spool."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from router.daemon.status_socket import query

ROOT = Path(__file__).resolve().parent.parent
DAEMON_USER = "qrouter"  # what the daemon becomes, started as root (the `user` key's default)


def stopped(pid: int) -> bool:
    """Every thread of the process stopped (after SIGSTOP). The process's own state is its main thread's: a
    session thread may still be claiming a message a moment after the main thread stopped."""
    task = Path(f"/proc/{pid}/task")
    try:
        states = [(task / tid / "stat").read_text().rpartition(")")[2].split()[0] for tid in os.listdir(task)]
    except FileNotFoundError:
        return False
    return all(state in ("T", "t") for state in states)


def freeze(pids: list[int]) -> None:
    """SIGSTOP these processes and wait until every thread of each has stopped."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: all(stopped(pid) for pid in pids), timeout=30, what="the processes stopped")


def contents(path: Path) -> bytes | None:
    """A spool file's bytes, or None while it is not there: with a short backoff a worker may claim a deferred
    message (rename it into active/) between a look at deferred/ and the read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def qrouter(*args: str, stdin: bytes = b"", check: bool = False, timeout: float = 30,
            launcher_prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the `qrouter` command as a user would; `launcher_prefix` runs it through another
    command first (setpriv, to run it as another user)."""
    result = subprocess.run([*(launcher_prefix or []), sys.executable, "-m", "router", *args], input=stdin,
                            capture_output=True, timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"qrouter {' '.join(args)} exited {result.returncode}: {result.stderr.decode()}")
    return result


def wait_for(condition: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


DELIVERY_FIELDS = re.compile(rb"Return-Path: <[^>\r\n]*>\r?\n(?:Delivered-To: [^\r\n]*\r?\n)+")


def message_in(path: Path) -> bytes:
    """A delivered message as it was queued: the Return-Path: and Delivered-To: lines a final
    delivery puts in front (router/headers.prepend_fields) are checked and taken off."""
    data = path.read_bytes()
    fields = DELIVERY_FIELDS.match(data)
    assert fields, f"{path} does not begin with Return-Path: and Delivered-To: {data[:200]!r}"
    rest = data[fields.end():]
    blank = re.match(rb"\r?\n(?![\r\n]|[\x21-\x39\x3b-\x7e]+[ \t]*:)", rest)
    return rest[blank.end():] if blank else rest  # the empty line put before a message with no header


TRACE = re.compile(rb"Received: [^\r\n]*(?:\r?\n[ \t][^\r\n]*)*\r?\n")


def after_trace(message: bytes) -> tuple[str, bytes]:
    """The Received: field a hand-off puts first (router/spool/trace.py), unfolded, and the message
    after it, as it was handed in."""
    field = TRACE.match(message)
    assert field, f"the message does not begin with a Received: field: {message[:200]!r}"
    return " ".join(field[0].decode().split()), message[field.end():]


def reachable(path: Path, mode: int = 0o755) -> Path:
    """Let the daemon's user reach `path` (a test's directory, made 0700 under /tmp for root):
    `path` gets `mode`, and the directories above it up to /tmp are made searchable."""
    path.chmod(mode)
    for parent in path.parents:
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    return path


@contextmanager
def read_only(directory: Path):
    """`directory` made read-only by a bind mount over itself, for the length of a `with`."""
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


class Daemon:
    """`qrouter run --foreground` in a subprocess, logging to a file the test can read."""

    def __init__(self, tmp: Path, *args: str, workers: int = 2, preexec_fn=None, launcher: list[str] | None = None,
                 maildir: bool = True):
        self.tmp = tmp
        self.spool = tmp / "spool"
        self.mail = tmp / "mail"
        self.log_path = tmp / "qrouter.log"
        self.args = ["--queue-dir", str(self.spool), "--workers", str(workers), *args]
        if maildir and "--default-transport" not in args and "--config" not in args:
            self.args += ["--default-transport", f"queue/maildir {self.mail}/%d/%u"]
        self.preexec_fn = preexec_fn
        self.launcher = launcher or [sys.executable, "-m", "router"]  # what runs `qrouter`
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Daemon:
        before = self.log().count("started:")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([*self.launcher, "run", "--foreground", *self.args],
                                        stdout=log, stderr=log, cwd=ROOT, preexec_fn=self.preexec_fn)
        log.close()
        if wait:
            wait_for(lambda: self.log().count("started:") > before or self.process.poll() is not None,
                     what="daemon start")
            assert self.process.poll() is None, f"daemon exited {self.process.returncode}:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict:
        """The daemon's answer on its status socket: what `qrouter status --json` shows but the
        queue counts (which that command adds from the spool). Asked from this process, as
        starting `qrouter` takes half a second, far longer than the answer."""
        return query(str(self.spool / "status.sock"), {"command": "status"})

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"]]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def files(self, queue: str) -> list[str]:
        return sorted(os.listdir(self.spool / queue)) if (self.spool / queue).exists() else []

    def delivered(self, pattern: str = "*/*") -> list[Path]:
        """Messages in the Maildirs under mail/, e.g. pattern "example.org/user"."""
        return sorted(Path(p) for p in glob.glob(str(self.mail / pattern / "new" / "*")))

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until incoming/ and active/ are empty and no worker holds a message."""
        def idle() -> bool:
            if self.files("incoming") or self.files("active"):
                return False
            return all(w["queue_id"] is None for w in self.status()["workers"])
        wait_for(idle, timeout, "the queue to drain")
