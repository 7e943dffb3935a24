"""One daemon per spool: flocks held for the daemon's lifetime, on the queue directory itself and
on `QUEUE-DIR/qrouter.pid`.

The lock on the directory is the guarantee. It is there even when the disk is full: flock needs
no free space, and the directory always exists, whereas creating the pid file needs an inode and
writing the pid needs a block. A daemon that finds no room for its pid file still starts (only
delivery frees space) and logs that it runs without one; a second daemon is refused all the same,
by the directory lock, even once there is room again for it to make a pid file of its own.

The pid file is locked too, after the directory: the qpsmtpd plugin flock-tests it to learn
whether a daemon serves the spool and reads the pid to say which (a daemon without a pid file
looks absent to it, and the plugin's attempt to start another is refused), and a daemon of an
earlier version locks only the pid file. The pid also lets a second daemon say who is in the way.

Workers inherit both locks, so a new daemon cannot start while workers of a dead one are still
finishing. flock on a directory needs a local file system, as inotify does anyway.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator

import psutil

log = logging.getLogger("qrouter")

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # only delivery frees space: these must not stop a start


class LockError(RuntimeError):
    pass


class SpoolNotAllowed(LockError):
    """The spool directory cannot be opened by this user (it is the daemon user's, mode 0700)."""


class SpoolLock:
    def __init__(self, queue_dir: str):
        self.queue_dir = queue_dir
        self.path = os.path.join(queue_dir, "qrouter.pid")
        self.fds: list[int] = []

    def acquire(self, wait_for_dead: float = 5.0) -> None:
        """Take the lock or raise LockError naming the holder. If the recorded holder is dead,
        its workers are still exiting: wait a little for them rather than refuse."""
        deadline = time.monotonic() + wait_for_dead
        try:
            self._take(os.open(self.queue_dir, os.O_RDONLY | os.O_DIRECTORY), self.queue_dir, deadline)
            pid_fd = self._open_pid_file()
            if pid_fd is not None:
                self._take(pid_fd, self.path, deadline)
                self._write_pid(pid_fd)
        except BaseException:
            self.release()
            raise

    def _take(self, fd: int, locked: str, deadline: float) -> None:
        self.fds.append(fd)  # from now on released with the others, taken or not
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                holder = self._holder()
                if (holder and psutil.pid_exists(holder)) or time.monotonic() > deadline:
                    raise LockError(f"spool {self.queue_dir} is in use by qrouter pid "
                                    f"{holder or 'unknown'} (lock on {locked})") from None
                time.sleep(0.05)

    def _open_pid_file(self) -> int | None:
        """The pid file, made if need be; None if there is no room to make it."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            self._warn(exc)
            return None

    def _write_pid(self, fd: int) -> None:
        pid = f"{os.getpid()}\n".encode()
        try:
            os.pwrite(fd, pid, 0)  # over the last daemon's pid: bytes already there need no new space
            os.ftruncate(fd, len(pid))
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            os.ftruncate(fd, 0)  # no pid rather than a dead daemon's
            self._warn(exc)

    def _warn(self, exc: OSError) -> None:
        log.warning("cannot write pid file %s: %s; running without it (the spool is locked all the same)",
                    self.path, exc.strerror)

    def _holder(self) -> int:
        """The pid in the pid file; 0 if there is none (not written yet, or no room for it)."""
        try:
            with open(self.path, "rb") as pid_file:
                text = pid_file.readline(32).decode(errors="replace").strip()
        except OSError:
            return 0
        return int(text) if text.isdigit() else 0

    def release(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


@contextlib.contextmanager
def unless_daemon(queue_dir: str) -> Iterator[bool]:
    """For a command that changes the spool without a daemon: yields True with the spool locked
    for the length of the `with` (no daemon can start meanwhile), or False when a daemon holds
    it, and the command must ask that daemon instead. Raises SpoolNotAllowed for a user who may
    not open the spool: whether a daemon runs cannot then be known, nor anything changed."""
    try:
        fd = os.open(queue_dir, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError as exc:
        raise SpoolNotAllowed(f"cannot open spool {queue_dir}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
