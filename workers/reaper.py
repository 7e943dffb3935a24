"""Nothing a program starts outlives its delivery: each run of a program has a reaper of its own.

A pipe program may leave processes behind: `sleep 600 &`, a daemon that calls setsid and forks
again. Killing the program's process group misses those that left it, and a child still running
when the program exits would be killed by nobody. So each run has a process of its own between
the worker and the program, its reaper: forked from the session thread, it makes itself a child
subreaper (prctl PR_SET_CHILD_SUBREAPER) and then starts the program. An orphan goes to its
nearest subreaper ancestor, not to init, so whatever the program starts stays below the reaper
for as long as it lives, however it detaches (a new session, a new process group, a double
fork): the processes of a run are exactly the reaper's descendants.

That is what tells the runs of one worker apart. A single subreaper for the whole worker could
not: an orphan no longer shows its parent, a new session hides the old one, runs at the same
time may be the same user's, and start times only say which runs an orphan may come from.

The reaper reaps whatever ends below it, writes the program's wait status to the worker, and
exits once nothing is left below it. When the delivery ends (the program exited and its output
was read, or its time ran out), the worker sends the reaper SIGTERM; the reaper sends SIGTERM
(and SIGCONT, for a stopped one) to every process below it, SIGKILL after KILL_GRACE to those
still there, and exits when they are all gone. It does the same if the worker dies
(PR_SET_PDEATHSIG).

The reaper is a fork of the worker, not a new program: only a fork keeps the thread's right to
start the program as another user and to signal it (CAP_SETUID, CAP_SETGID, CAP_KILL; see
router/config/privileges.py), and a program run as another user can neither signal nor trace it. Forked
from one thread of a process with many, it runs only code that takes no lock another thread may
have held at the fork (no logging, no imports), and it never returns into the worker's code.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL to what a run left
TICK = 0.02  # seconds between looks at what is left, while ending a run
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
STARTED = b"started"

_libc = ctypes.CDLL(None, use_errno=True)


class StartError(Exception):
    """The program could not be started; the message says why (the OSError's text)."""


class _End(Exception):
    """Raised by the reaper's SIGTERM handler: end the run now."""


class Run:
    """One program running below its reaper, seen from the worker: the program's input and
    output pipes, and its exit status once the reaper has reported it."""

    def __init__(self, reaper: int, stdin: int, stdout: int, status: int) -> None:
        self.reaper = reaper
        self.stdin: int | None = stdin  # None once closed
        self.stdout = stdout
        self.status = status  # lines from the reaper: "started" or "error REASON", then "exit WAITSTATUS"
        self.pending = b""
        self.returncode: int | None = None  # as Popen's: negative for a signal

    @classmethod
    def start(cls, argv: tuple[str, ...], env: Mapping[str, str], cwd: str, ids: Mapping[str, Any]) -> Run:
        """Fork the reaper, which starts the program with `env` in `cwd` as `ids` (Popen's user,
        group, extra_groups), its standard error on its output, in a process group of its own.
        Raises OSError if the reaper cannot be forked, StartError if the program cannot start."""
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        status_read, status_write = os.pipe()
        worker = os.getpid()
        try:
            reaper = os.fork()
        except OSError:
            for fd in (stdin_read, stdin_write, stdout_read, stdout_write, status_read, status_write):
                os.close(fd)
            raise
        if reaper == 0:
            _reaper(worker, argv, env, cwd, ids, stdin_read, stdout_write, status_write)
        for fd in (stdin_read, stdout_write, status_write):
            os.close(fd)
        run = cls(reaper, stdin_write, stdout_read, status_read)
        first = run._line(block=True)
        if first != STARTED:
            run.end()
            raise StartError(first.removeprefix(b"error ").decode(errors="replace") if first else
                             "the process that starts it died")
        return run

    def poll(self) -> int | None:
        """The program's exit code if the reaper has reported it, else None (never waits)."""
        while self.returncode is None and (line := self._line(block=False)) is not None:
            if line.startswith(b"exit "):
                self.returncode = os.waitstatus_to_exitcode(int(line[5:]))
            elif not line:  # the reaper was killed (by root, by the OOM killer) before it could say
                self.returncode = -signal.SIGKILL
        return self.returncode

    def close_stdin(self) -> None:
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None

    def end(self) -> int:
        """End whatever is left of the run (SIGTERM, then SIGKILL after KILL_GRACE), wait until
        it is all gone, and return the program's exit code. The reaper is this thread's child,
        waited for by nobody else, so its pid is still its own even after it exited."""
        self.close_stdin()
        os.close(self.stdout)
        os.kill(self.reaper, signal.SIGTERM)
        os.waitpid(self.reaper, 0)  # if a process cannot be killed this waits, and the watchdog sees it
        returncode = self.poll()  # the reaper is gone: what it wrote while ending the run, or the end
        os.close(self.status)
        assert returncode is not None
        return returncode

    def _line(self, block: bool) -> bytes | None:
        """The next line from the reaper without its end of line; b"" at its end, None when
        nothing is there yet (block=False)."""
        os.set_blocking(self.status, block)
        while b"\n" not in self.pending:
            try:
                chunk = os.read(self.status, 4096)
            except BlockingIOError:
                return None
            if not chunk:
                return b""
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line


# -- the reaper process ------------------------------------------------------------------------

def _reaper(worker: int, argv: tuple[str, ...], env: Mapping[str, str], cwd: str, ids: Mapping[str, Any],
            stdin: int, stdout: int, status: int) -> NoReturn:
    """The reaper's whole life, in the forked child: it must never return into the worker's code."""
    program = 0
    try:
        gc.disable()  # a collection would touch, hence copy, every page of the worker's heap
        signal.signal(signal.SIGTERM, _on_term)
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        _close_all_but(stdin, stdout, status)
        if os.getppid() != worker:  # the worker died before PR_SET_PDEATHSIG was set
            os._exit(0)
        try:
            process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=subprocess.STDOUT,
                                       close_fds=True, process_group=0, umask=0o077, **ids)
            program = process.pid  # the object is kept: dropped, it would reap the program itself
        except (OSError, ValueError) as exc:  # ValueError: a NUL in an argument or variable
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            _tell(status, b"error " + reason.encode(errors="replace").replace(b"\n", b" "))
            os._exit(0)
        os.close(stdin)
        os.close(stdout)
        _tell(status, STARTED)
        while True:
            try:
                pid, wait_status = os.waitpid(-1, 0)
            except ChildProcessError:  # nothing left below: the run is over
                os._exit(0)
            if pid == program:
                _tell(status, b"exit %d" % wait_status)
    except _End:
        _end_all(program, status)
    finally:
        os._exit(0)


def _tell(status: int, line: bytes) -> None:
    """One line to the worker, if it is still there to read it: a worker that died must not
    keep the reaper from ending the run."""
    try:
        os.write(status, line + b"\n")
    except OSError:
        pass


def _on_term(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once is enough: a second would cut the ending short
    raise _End


def _close_all_but(*keep: int) -> None:
    """Close every descriptor of the worker but `keep` and the standard ones: the reaper must
    hold neither the spool lock nor the pipes of other runs (a program would never see the end
    of its input while a copy of its pipe's write end is open elsewhere)."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _end_all(program: int, status: int) -> None:
    """SIGTERM (and SIGCONT) to everything below; SIGKILL after KILL_GRACE, again and again,
    until nothing is left. Most often nothing is: the program has exited, and left nothing."""
    if not _reap(program, status):
        return
    _signal_below(signal.SIGTERM, signal.SIGCONT)
    deadline = time.monotonic() + KILL_GRACE
    while _reap(program, status) and time.monotonic() < deadline:
        time.sleep(TICK)
    while _reap(program, status):
        _signal_below(signal.SIGKILL)
        time.sleep(TICK)


def _reap(program: int, status: int) -> bool:
    """Reap what has ended below; False once nothing is left."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        if pid == program:
            _tell(status, b"exit %d" % wait_status)


def _signal_below(*signums: int) -> None:
    """Send `signums` to every process below this one. Each is signalled through a pidfd, and
    only if its start time, read after the pidfd was opened, is the one seen in the walk: a
    process that ended meanwhile may have given its pid to a stranger, and the pidfd names one
    process for good."""
    for pid, started in _descendants(os.getpid()):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone
            continue
        try:
            if (_stat(pid) or (0, 0))[1] == started:
                for signum in signums:
                    signal.pidfd_send_signal(pidfd, signum)
        except OSError:
            pass
        finally:
            os.close(pidfd)


def _descendants(root: int) -> Iterator[tuple[int, int]]:
    """(pid, start time) of every process below `root`, from /proc: its children, theirs, and so on."""
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))):
            children.setdefault(stat[0], []).append((int(name), stat[1]))
    below = list(children.get(root, ()))
    while below:
        pid, started = below.pop()
        yield pid, started
        below.extend(children.get(pid, ()))


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a process; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
        fields = data[data.rindex(b")") + 2:].split()  # the name, in parentheses, may hold anything
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):  # gone, or going
        return None
