"""One daemon per spool: an flock held on `QUEUE-DIR/qrouter.pid` for the daemon's lifetime.

The file also holds the pid, so a second daemon can say who is in the way. Workers inherit the
lock, so a new daemon cannot start while workers of a dead one are still finishing.
"""

from __future__ import annotations

import fcntl
import os
import time

import psutil


class LockError(RuntimeError):
    pass


class SpoolLock:
    def __init__(self, queue_dir: str):
        self.path = os.path.join(queue_dir, "qrouter.pid")
        self.fd = -1

    def acquire(self, wait_for_dead: float = 5.0) -> None:
        """Take the lock or raise LockError naming the holder. If the recorded holder is dead,
        its workers are still exiting: wait a little for them rather than refuse."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_for_dead
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder(fd)
                if (holder and psutil.pid_exists(holder)) or time.monotonic() > deadline:
                    os.close(fd)
                    raise LockError(f"spool {os.path.dirname(self.path)} is in use by qrouter pid "
                                    f"{holder or 'unknown'} (lock {self.path})") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    @staticmethod
    def _holder(fd: int) -> int:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else 0

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
