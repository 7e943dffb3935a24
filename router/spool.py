"""The spool: one directory per queue state, and the only code that moves files between them.

    tmp/       writers stage new files here; nothing else reads it
    incoming/  queued, never tried: the supervisor hands each new file to a worker
    active/    claimed by a worker (atomic rename); left here only by a crash
    deferred/  waiting for a retry; the file's mtime is its next attempt time
    hold/      set aside by the administrator or as poison (it killed workers)
    corrupt/   unreadable queue files, kept for inspection
    archive/   finished messages kept by `archive-failed`

A message is "queued" once its file is fsynced, renamed into incoming/ and the directory fsynced.
Every later change of content goes through a fsynced file in tmp/ renamed over the old one, so a
crash leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import grp
import os
from collections.abc import Iterable
from pathlib import Path

from router.address import AddressError, parse_path
from router.durable import unlink_quietly, write_all, write_synced
from router.queue_file import QueueFile, Recipient, journal_record
from router.queue_id import arrival_of, is_queue_id, new_queue_id

TMP, INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT, ARCHIVE = (
    "tmp", "incoming", "active", "deferred", "hold", "corrupt", "archive")
QUEUES = (TMP, INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT, ARCHIVE)
STALE_TMP_SECONDS = 36 * 3600


class SpoolError(Exception):
    """A message could not be queued. `temporary` says whether trying again later may work."""

    def __init__(self, message: str, temporary: bool):
        super().__init__(message)
        self.temporary = temporary


class Spool:
    def __init__(self, root: str | os.PathLike, group: str = ""):
        self.root = Path(root)
        self._prefix = os.path.join(self.root, "")  # "ROOT/": paths are made several times a message
        self.group = group
        self._dir_fds: dict[str, int] = {}

    def path(self, queue: str, queue_id: str = "") -> str:
        return f"{self._prefix}{queue}/{queue_id}" if queue_id else f"{self._prefix}{queue}"

    def create(self) -> None:
        """Make the queue directories: 0700, or 2770 owned by `group` so a front door running as
        another user of that group (qpsmtpd) can queue into it."""
        mode = 0o2770 if self.group else 0o700
        gid = grp.getgrnam(self.group).gr_gid if self.group else -1
        for directory in (self.root, *(self.path(q) for q in QUEUES)):
            os.makedirs(directory, exist_ok=True)
            os.chmod(directory, mode)
            if gid >= 0:
                os.chown(directory, -1, gid)

    # -- writing new messages -------------------------------------------------------------

    def enqueue(self, sender: str, recipients: Iterable[str], message: bytes, *,
                notify: str = "", envid: str = "", ret: str = "") -> str:
        """Queue a message durably and return its queue id; raise SpoolError otherwise.

        Addresses are checked first (a permanent error); then the file is staged in tmp/,
        fsynced, renamed into incoming/ and incoming/ fsynced. On any failure nothing is left
        in incoming/.
        """
        try:
            sender = parse_path(sender, null_ok=True)
            rcpts = [Recipient(parse_path(r), notify=notify) for r in recipients]
        except AddressError as exc:
            raise SpoolError(str(exc), temporary=False) from None
        if not rcpts:
            raise SpoolError("no recipients given", temporary=False)
        queue_id = new_queue_id()
        queue_file = QueueFile(queue_id, arrival_of(queue_id), sender, rcpts, message,
                               envid=envid, ret=ret)
        try:
            self.write(queue_file, INCOMING)
        except OSError as exc:
            raise SpoolError(f"cannot queue into {self.root}: {exc.strerror or exc}", temporary=True) from None
        return queue_id

    def write(self, queue_file: QueueFile, queue: str) -> None:
        """Write a queue file to `queue` atomically and durably, replacing any file of that id."""
        staged = self.path(TMP, queue_file.queue_id)
        write_synced(staged, queue_file.to_bytes(), mode=0o660 if self.group else 0o600)
        try:
            os.rename(staged, self.path(queue, queue_file.queue_id))
            self.sync_dir(queue)
        except BaseException:
            unlink_quietly(staged)
            raise

    def sync_dir(self, queue: str) -> None:
        fd = self._dir_fds.get(queue)
        if fd is None:
            fd = self._dir_fds[queue] = os.open(self.path(queue), os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)

    def close(self) -> None:
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()

    # -- moving messages between queues ---------------------------------------------------

    def claim(self, queue: str, queue_id: str) -> str | None:
        """Take a message into active/ by atomic rename; None if another worker (or an
        administrator) moved it first."""
        target = self.path(ACTIVE, queue_id)
        try:
            os.rename(self.path(queue, queue_id), target)
        except FileNotFoundError:
            return None
        return target

    def move(self, queue_id: str, source: str, target: str, *, mtime: float | None = None) -> bool:
        """Rename a message from one queue to another; False if it was not in `source`."""
        path = self.path(source, queue_id)
        try:
            if mtime is not None:
                os.utime(path, (mtime, mtime))
            os.rename(path, self.path(target, queue_id))
        except FileNotFoundError:
            return False
        return True

    def remove(self, queue: str, queue_id: str) -> bool:
        """Unlink a finished message; False if it was not in `queue`.

        Done in the delivering worker itself: an unlink can wait on the disk for a while
        (freeing blocks), but with more workers than cores another worker uses the CPU meanwhile,
        where handing unlinks to a thread cost more CPU in lock handoffs than the unlink itself.
        """
        try:
            os.unlink(self.path(queue, queue_id))
        except FileNotFoundError:
            return False
        return True

    def journal(self, queue_id: str, results: Iterable[tuple[int, Recipient]]) -> None:
        """Append recipient results to an active file and fsync: from here on a crash cannot
        make qrouter deliver to those recipients again."""
        record = b"".join(journal_record(index, rcpt) for index, rcpt in results)
        fd = os.open(self.path(ACTIVE, queue_id), os.O_WRONLY | os.O_APPEND)
        size = os.fstat(fd).st_size
        try:
            write_all(fd, record)
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # a torn record must not glue itself to the next one
            raise
        finally:
            os.close(fd)

    # -- looking at queues ----------------------------------------------------------------

    def list(self, queue: str) -> list[str]:
        try:
            return [entry.name for entry in os.scandir(self.path(queue)) if entry.is_file()]
        except FileNotFoundError:
            return []

    def recover_active(self) -> list[str]:
        """Put files a crashed run left in active/ back into incoming/ (before any worker runs)."""
        recovered = self.list(ACTIVE)
        for queue_id in recovered:
            self.move(queue_id, ACTIVE, INCOMING)
        return recovered

    def remove_stale_tmp(self, now: float) -> list[str]:
        """Drop staging files of writers that died long ago (a live writer's are recent)."""
        stale = []
        for entry in os.scandir(self.path(TMP)):
            try:
                if entry.stat().st_mtime < now - STALE_TMP_SECONDS:
                    os.unlink(entry.path)
                    stale.append(entry.name)
            except FileNotFoundError:
                pass
        return stale

    def counts(self) -> dict[str, dict[str, float | int | None]]:
        """Messages per queue and the arrival of the oldest, read from the ids alone."""
        result: dict[str, dict[str, float | int | None]] = {}
        for queue in QUEUES[1:]:
            ids = [name for name in self.list(queue) if is_queue_id(name)]
            result[queue] = {"messages": len(ids), "oldest": arrival_of(min(ids)) if ids else None}
        return result
