"""Run one external program for one delivery, as a given unix user: the local delivery agents
(maildrop, procmail) and pipe programs, the way Postfix's local(8) and pipe(8) run them.

Whatever the program does, the worker must stay safe and keep going, so:
- there is never a shell: argv goes to execve as it is, so no address or argument is ever parsed;
- the program gets nothing of ours: a fresh environment, no open files, no capabilities, our
  umask, the account's ids and groups (set by Popen in the child, which is thread-safe);
- it runs below a reaper of its own (workers/reaper.py), so that when the delivery ends, at the
  program's exit or at its time limit, everything it started ends too: SIGTERM, then SIGKILL;
- its output is read and its input written in the caller's thread, at once, so neither side can
  block the other, and only the first OUTPUT_KEEP bytes are kept, however much it writes;
- a child that keeps the output open after the program exits is not waited for, but ended.
The exit status becomes a delivery result as pipe(8) maps sysexits (`verdict`).
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import selectors
import signal
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from workers.reaper import Run, StartError
from workers.transport import BOUNCED, DEFERRED, SENT

REPLY_CHARS = 200
OUTPUT_KEEP = 4096  # bytes of output kept for the reply; the rest is read and thrown away
CHUNK = 65536  # bytes read or written at a time
GRACE = 1.0  # seconds to read on after the program exited, while a child of it keeps the output open
PATH = "/usr/local/bin:/usr/bin:/bin"

# sysexits.h, as pipe(8) maps them; any other status is 5.3.0
_SYSEXITS = {
    os.EX_TEMPFAIL: (DEFERRED, "4.3.0"),
    os.EX_OSERR: (DEFERRED, "4.3.0"),
    os.EX_NOUSER: (BOUNCED, "5.1.1"),
    os.EX_NOHOST: (BOUNCED, "5.1.2"),
    os.EX_DATAERR: (BOUNCED, "5.6.0"),
    os.EX_NOPERM: (BOUNCED, "5.7.0"),
    os.EX_CONFIG: (BOUNCED, "5.3.5"),
}
_EXIT_NAMES = {getattr(os, name): name for name in dir(os) if name.startswith("EX_") and name != "EX_OK"}
_ENHANCED = re.compile(r"([45])\.\d{1,3}\.\d{1,3}(?=\s|$)")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")  # those that are not white space


_runs_lock = threading.Lock()
_runs: dict[int, float] = {}  # runs in progress: their start times (time.monotonic)
_run_ids = itertools.count()


@dataclass(frozen=True)
class Account:
    """Who a program runs as: a passwd entry with its groups."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups (os.getgrouplist)
    home: str
    shell: str

    @classmethod
    def named(cls, name: str) -> Account:
        try:
            entry = pwd.getpwnam(name)
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            raise LookupError(f"no such unix user {name!r}") from None
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid,
                   tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)), entry.pw_dir, entry.pw_shell)


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]  # argv[0] is an absolute path; never given to a shell
    account: Account
    env: Mapping[str, str]  # extra variables (SENDER, RECIPIENT, ...) on top of the account's
    time_limit: float  # seconds for the whole run


@dataclass(frozen=True)
class Result:
    status: str  # workers.transport.SENT / DEFERRED / BOUNCED
    dsn: str  # enhanced status code, e.g. "2.0.0", "4.3.0", "5.1.1"
    reply: str  # at most REPLY_CHARS characters, cleaned of control characters


def environment(account: Account, extra: Mapping[str, str]) -> dict[str, str]:
    """The whole environment a program gets: nothing inherited; HOME, USER, LOGNAME, SHELL from the
    passwd entry, PATH=/usr/local/bin:/usr/bin:/bin, then `extra`."""
    return {"HOME": account.home, "USER": account.name, "LOGNAME": account.name, "SHELL": account.shell,
            "PATH": PATH, **extra}


def run(command: Command, message: bytes) -> Result:
    """Run the program with `message` on its input and say how it went. Never raises for what the
    program does; a program that cannot be started is a temporary failure (4.3.0)."""
    program, account = command.argv[0], command.account
    if account.uid == 0:
        return Result(DEFERRED, "4.3.0", _clean(f"refusing to run {program} as root"))
    ids: dict[str, Any] = {}  # as ourselves, nothing to change (and only root may setgroups)
    if account.uid != os.geteuid():
        ids = {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)}
    with _in_progress():
        deadline = time.monotonic() + command.time_limit
        try:
            process = Run.start(command.argv, environment(account, command.env), workdir(account), ids)
        except (OSError, StartError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return Result(DEFERRED, "4.3.0", _clean(f"cannot run {program}: {reason}"))
        try:
            output, timed_out = _talk(process, message, deadline)
        finally:  # the program and all it started, whether it exited or overstayed
            returncode = process.end()
    return verdict(returncode, output, timed_out, command.time_limit, program)


def verdict(returncode: int, output: bytes, timed_out: bool, time_limit: float, program: str) -> Result:
    """Pure mapping from how the program ended to a Result (unit-tested directly)."""
    text = _clean(output.decode("utf-8", "replace"))
    if timed_out:
        limit = f"command time limit of {time_limit:g}s exceeded: {program}"
        return Result(BOUNCED, "5.3.0", _with_output(limit, text))
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return Result(DEFERRED, "4.3.0", _with_output(f"{program} killed by signal {name}", text))
    if returncode == 0:
        return Result(SENT, "2.0.0", text or _clean(f"delivered via {program}"))
    known = _EXIT_NAMES.get(returncode)
    description = _clean(f"{program} exited with status {returncode}" + (f" ({known})" if known else ""))
    code = _ENHANCED.match(text)
    if code:
        status = DEFERRED if code[1] == "4" else BOUNCED
        return Result(status, code[0], text[code.end():].lstrip() or description)
    status, dsn = _SYSEXITS.get(returncode, (BOUNCED, "5.3.0"))
    return Result(status, dsn, text or description)


def longest_run() -> float:
    """Seconds the oldest run in progress in this process has been going; 0.0 when none.
    The worker's main thread uses it to stop saying it is alive when a run hangs far beyond its
    time limit, so the supervisor's watchdog replaces the worker."""
    with _runs_lock:
        oldest = min(_runs.values(), default=None)
    return 0.0 if oldest is None else time.monotonic() - oldest


@contextmanager
def _in_progress() -> Iterator[None]:
    key = next(_run_ids)
    with _runs_lock:
        _runs[key] = time.monotonic()
    try:
        yield
    finally:
        with _runs_lock:
            del _runs[key]


def _talk(process: Run, message: bytes, deadline: float) -> tuple[bytes, bool]:
    """Write `message` to the program and read its output at once, until it has exited and its
    output is closed (or GRACE after its exit), or the deadline: then True. Returns the first
    OUTPUT_KEEP bytes of the output."""
    reading, writing = process.stdout, process.stdin
    assert writing is not None
    output = bytearray()
    pending = memoryview(message)
    exited: float | None = None
    with selectors.DefaultSelector() as selector:
        for fd, event in ((reading, selectors.EVENT_READ), (writing, selectors.EVENT_WRITE)):
            os.set_blocking(fd, False)
            selector.register(fd, event)
        selector.register(process.status, selectors.EVENT_READ)  # where the reaper says it has exited
        while True:
            now = time.monotonic()
            if exited is None and process.poll() is not None:
                exited = now
                selector.unregister(process.status)
            if exited is None and now >= deadline:
                return bytes(output), True
            if exited is not None and (reading not in selector.get_map() or now >= exited + GRACE):
                return bytes(output), False  # what keeps the output open is not the program: it is ended
            timeout = exited + GRACE - now if exited is not None else deadline - now
            for key, _ in selector.select(timeout):
                if key.fd == process.status:
                    continue  # read by poll()
                if key.fd == reading:
                    with suppress(BlockingIOError):
                        chunk = os.read(reading, CHUNK)
                        if not chunk:
                            selector.unregister(reading)
                        output += chunk[:OUTPUT_KEEP - len(output)]
                    continue
                try:
                    written = os.write(writing, pending[:CHUNK])
                except BlockingIOError:
                    continue
                except BrokenPipeError:  # it wants no more: no failure unless its exit status says so
                    written = len(pending)
                pending = pending[written:]
                if not pending:
                    selector.unregister(writing)
                    process.close_stdin()


def workdir(account: Account) -> str:
    """Where a program run as `account` starts: its home if it may enter it, else "/" (as
    `qrouter route` shows too). Popen changes directory before it changes user, so the check is
    made here, by the modes of the home and the directories above it, for the account."""
    if not os.path.isabs(account.home):
        return "/"
    path = os.path.realpath(account.home)
    parts = path.split("/")
    for end in range(1, len(parts) + 1):
        try:
            info = os.stat("/".join(parts[:end]) or "/")
        except (OSError, ValueError):
            return "/"
        if info.st_uid == account.uid:
            search = stat.S_IXUSR
        elif info.st_gid == account.gid or info.st_gid in account.groups:
            search = stat.S_IXGRP
        else:
            search = stat.S_IXOTH
        if not stat.S_ISDIR(info.st_mode) or not info.st_mode & search:
            return "/"
    return path


def _with_output(description: str, text: str) -> str:
    return _clean(f"{description}: {text}" if text else description)


def _clean(text: str) -> str:
    """One line of at most REPLY_CHARS for a log and a queue file: runs of white space become one
    space, other control characters go."""
    return " ".join(_CONTROL.sub("", text).split())[:REPLY_CHARS].rstrip()
