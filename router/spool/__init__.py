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

import errno
import os
import resource
import stat
from collections.abc import Iterable
from pathlib import Path

from router.spool.address import AddressError, parse_path
from router.spool.drain import read_drain
from router.spool.durable import make_shared_dir, unlink_quietly, write_all, write_synced
from router.spool.files import NotARegularFile, kind_of, open_regular
from router.spool.queue_file import (
    CRASH_RECORD,
    HELD_RECORD,
    MAX_HEADER,
    MAX_OVERHEAD,
    QueueFile,
    Recipient,
    journal_record,
    journal_start,
)
from router.spool.queue_id import arrival_of, is_queue_id, new_queue_id

TMP, INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT, ARCHIVE = (
    "tmp", "incoming", "active", "deferred", "hold", "corrupt", "archive")
QUEUES = (TMP, INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT, ARCHIVE)
STALE_TMP_SECONDS = 36 * 3600
_NOT_READABLE = {errno.ELOOP: "a symbolic link, not a queue file", errno.EACCES: "cannot be read (permission denied)",
                 errno.EPERM: "cannot be read (operation not permitted)", errno.ENXIO: "a socket or device, not a file"}
DEFAULT_SIZE_LIMIT = 100 * 2**20  # message-size-limit: no message, and so no read, is larger


def staging_name(queue_id: str, queue: str) -> str:
    """The name in tmp/ under which a file for `queue` is written (see Spool.write)."""
    return queue_id if queue == INCOMING else f"{queue_id}.{queue}"


def read_queue_file(path: str, limit: int) -> bytes:
    """The bytes of a queue file, read as a file someone else may have put there: a symbolic
    link is not followed, a FIFO or device is not waited on, and no more than `limit` bytes are
    read. Raises NotAQueueFile for anything that is not a regular file of at most `limit` bytes,
    OSError for a failure of the disk (the file may be fine later)."""
    try:
        fd, info = open_regular(path)
    except NotARegularFile as exc:
        raise NotAQueueFile(f"{path}: not a regular file but {exc.kind}") from None
    except OSError as exc:
        if exc.errno in _NOT_READABLE:
            raise NotAQueueFile(f"{path}: {_NOT_READABLE[exc.errno]}") from None
        raise
    try:
        if info.st_size > limit:
            raise NotAQueueFile(f"{path}: {info.st_size} bytes, larger than any queue file may be ({limit})")
        data = os.read(fd, info.st_size + 1)  # a regular file reads short only at its end
        while info.st_size < len(data) <= limit and (more := os.read(fd, 1 << 16)):
            data += more  # it grew since the fstat: a journal append
        if len(data) > limit:
            raise NotAQueueFile(f"{path}: grew past {limit} bytes while being read")
        return data
    finally:
        os.close(fd)


class NotAQueueFile(Exception):
    """Something in a queue directory that no queue file can be; it belongs in corrupt/."""


class SpoolError(Exception):
    """A message could not be queued. `temporary` says whether trying again later may work."""

    def __init__(self, message: str, temporary: bool):
        super().__init__(message)
        self.temporary = temporary


class Spool:
    def __init__(self, root: str | os.PathLike, group: str = "", size_limit: int = DEFAULT_SIZE_LIMIT):
        self.root = Path(root)
        self.size_limit = size_limit
        self._prefix = os.path.join(self.root, "")  # "ROOT/": paths are made several times a message
        self.group = group
        self._dir_fds: dict[str, int] = {}

    def path(self, queue: str, queue_id: str = "") -> str:
        return f"{self._prefix}{queue}/{queue_id}" if queue_id else f"{self._prefix}{queue}"

    def create(self) -> None:
        """Make the queue directories: 0700, or 2770 owned by `group` so a front door running as
        another user of that group (qpsmtpd) can queue into it."""
        for directory in (str(self.root), *(self.path(q) for q in QUEUES)):
            make_shared_dir(directory, self.group)

    # -- writing new messages -------------------------------------------------------------

    def enqueue(self, sender: str, recipients: Iterable[str | Recipient], message: bytes, *,
                notify: str = "", envid: str = "", ret: str = "", queue_id: str = "",
                arrival: float | None = None) -> str:
        """Queue a message durably and return its queue id; raise SpoolError otherwise.

        Addresses are checked first (a permanent error); then the file is staged in tmp/,
        fsynced, renamed into incoming/ and incoming/ fsynced. On any failure nothing is left
        in incoming/. `queue_id` is one made beforehand by new_queue_id(), for a writer whose
        message names its id (a Received: field); by default a new one is made. A recipient
        given as a Recipient keeps its own NOTIFY and ORCPT (an SMTP front door that takes DSN);
        `arrival` is an earlier arrival than now that max-age counts from (mail a draining peer
        hands over, router/spool/trace.py). A spool being drained (router/spool/drain.py) takes
        nothing: a temporary SpoolError says where the mail goes instead.
        """
        drain = read_drain(self.root)
        if drain is not None:
            raise SpoolError(drain.refusal(), temporary=True)
        try:
            sender = parse_path(sender, null_ok=True)
            rcpts = [Recipient(parse_path(r.address), notify=r.notify, orcpt=r.orcpt) if isinstance(r, Recipient)
                     else Recipient(parse_path(r), notify=notify) for r in recipients]
        except AddressError as exc:
            raise SpoolError(str(exc), temporary=False) from None
        if not rcpts:
            raise SpoolError("no recipients given", temporary=False)
        if len(message) > self.size_limit:
            raise SpoolError(f"message is larger than message-size-limit ({self.size_limit} bytes)",
                             temporary=False)
        queue_id = queue_id or new_queue_id()
        queue_file = QueueFile(queue_id, min(arrival_of(queue_id), arrival or float("inf")), sender, rcpts,
                               message, envid=envid, ret=ret)
        try:
            self.write(queue_file, INCOMING)
        except OSError as exc:
            raise SpoolError(f"cannot queue into {self.root}: {exc.strerror or exc}", temporary=True) from None
        return queue_id

    def write(self, queue_file: QueueFile, queue: str) -> None:
        """Write a queue file to `queue` atomically and durably, replacing any file of that id.

        A new message is staged as `tmp/ID`, as every front door stages it; the daemon's own
        rewrites of a queued message as `tmp/ID.QUEUE`, so that the daemon can tell its own
        leftovers (a worker killed while rewriting) from a front door's file still being written."""
        staged = self.path(TMP, staging_name(queue_file.queue_id, queue))
        owner = os.stat(self.root).st_uid if os.geteuid() == 0 else -1  # root's files would be unreadable
        write_synced(staged, queue_file.to_bytes(), mode=0o660 if self.group else 0o600, owner=owner)
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
        administrator) moved it first. A rename that fails for something that is no regular file
        raises NotAQueueFile, not the OSError: a directory someone else made (renaming one needs
        write access to it) is no failure of the disk, and trying it again would never end."""
        source, target = self.path(queue, queue_id), self.path(ACTIVE, queue_id)
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return None
        except OSError:
            try:
                mode = os.lstat(source).st_mode
            except OSError:
                mode = stat.S_IFREG  # gone, or not to be looked at: the rename's error says more
            if not stat.S_ISREG(mode):
                raise NotAQueueFile(f"{source}: not a regular file but {kind_of(mode)}") from None
            raise
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

    def set_aside(self, name: str, source: str) -> str:
        """Move anything that is not a usable queue file (a file, a directory, a FIFO, a link)
        from `source` into corrupt/ for inspection, never over an earlier one of the same name;
        returns the name it got there. Raises OSError if it cannot be moved (a full disk)."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a name in {source}/")
        target, number = name, 0
        while os.path.lexists(self.path(CORRUPT, target)):
            number += 1
            target = f"{name}.{number}"
        os.rename(self.path(source, name), self.path(CORRUPT, target))
        return target

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
        opened = self._open_for_record(queue_id)  # cuts a line torn by a worker killed earlier
        if opened is None:
            raise FileNotFoundError(errno.ENOENT, "no queue file to journal in", self.path(ACTIVE, queue_id))
        fd, end = opened
        try:
            self._append_record(fd, end, record)  # a torn record must not glue itself to the next one
        finally:
            os.close(fd)

    # -- the count of workers a message killed --------------------------------------------

    def record_crash(self, queue_id: str) -> None:
        """Count a worker's death against the message it held: append `@* crash` to its file in
        active/ and fsync, so that the count survives a restart (docs/queue-format.md).

        The supervisor calls this once the worker is dead: nothing else writes the file then.
        A journal line the worker tore (killed in the middle of an append) is cut off first,
        since the record glued onto it would make the file unreadable; the message itself is
        never cut. Anything in active/ that is no queue file (a link, a FIFO, a directory, no
        header) is left alone for a worker to set aside. Raises OSError if the disk refuses
        (full, failing); the file is then as it was, but for the torn line."""
        opened = self._open_for_record(queue_id)
        if opened is None:
            return
        fd, end = opened
        try:
            self._append_record(fd, end, CRASH_RECORD)
        finally:
            os.close(fd)

    def hold_poison(self, queue_id: str) -> None:
        """Set aside a message that killed too many workers: append `@* held` to its file in
        active/ (its count starts again, so `mv hold/ID incoming/` gives it its tries again) and
        move it to hold/. Raises OSError if either step fails; the file then stays in active/
        with the count it had, never held halfway."""
        opened = self._open_for_record(queue_id)
        if opened is None:
            raise FileNotFoundError(errno.ENOENT, "no queue file to hold", self.path(ACTIVE, queue_id))
        fd, end = opened
        try:
            self._append_record(fd, end, HELD_RECORD)
            try:
                os.rename(self.path(ACTIVE, queue_id), self.path(HOLD, queue_id))
            except OSError:
                os.ftruncate(fd, end)  # still in active/: it must not be delivered as if released
                os.fsync(fd)
                raise
        finally:
            os.close(fd)
        try:
            self.sync_dir(HOLD)
        except OSError:
            pass  # it is in hold/ already; should the rename be lost, the count holds it again

    def _open_for_record(self, queue_id: str) -> tuple[int, int] | None:
        """Open active/ID to append a journal record: the descriptor and the end of its last
        whole line, to which the file has been cut. None for anything that is not a regular
        file with a queue file's header, or is gone."""
        try:
            fd, info = open_regular(self.path(ACTIVE, queue_id), os.O_RDWR | os.O_APPEND)
        except NotARegularFile:
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENXIO):
                return None
            raise
        try:
            end = self._whole_lines_end(fd, info.st_size) if info.st_size else None
            if end is not None and end < info.st_size:
                os.ftruncate(fd, end)
        except BaseException:
            os.close(fd)
            raise
        if end is None:
            os.close(fd)
            return None
        return fd, end

    @staticmethod
    def _whole_lines_end(fd: int, size: int) -> int | None:
        """Where the last whole journal line of a file of `size` bytes ends: its end if the file
        ends with LF; else the last LF after the message, found by the header's `size` line (a
        message need not end with LF). None if there is no such header or the file is shorter."""
        if os.pread(fd, 1, size - 1) == b"\n":
            return size  # the common case: nothing but one byte read
        start = journal_start(os.pread(fd, min(size, 1 << 16), 0))
        if start is None and size > 1 << 16:
            start = journal_start(os.pread(fd, min(size, MAX_HEADER), 0))
        if start is None or start > size:
            return None
        position = size
        while position > start:
            if size - position > MAX_OVERHEAD:
                return None  # no torn append is that long: leave the file as it is
            chunk_start = max(start, position - (1 << 16))
            newline = os.pread(fd, position - chunk_start, chunk_start).rfind(b"\n")
            if newline >= 0:
                return chunk_start + newline + 1
            position = chunk_start
        return start

    @staticmethod
    def _append_record(fd: int, end: int, record: bytes) -> None:
        """Append and fsync; on failure cut the file back to `end` (no torn record is left)."""
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and end + len(record) > limit:
            # What write(2) would say, without the SIGXFSZ that kills a process that has it at
            # its default action: the supervisor must never die of a message.
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        try:
            write_all(fd, record)
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, end)
            raise

    # -- looking at queues ----------------------------------------------------------------

    def list(self, queue: str) -> list[str]:
        """Every name in a queue directory, whatever it is: the caller decides what to do with
        names that are not queue ids or entries that are not files."""
        try:
            return [entry.name for entry in os.scandir(self.path(queue))]
        except FileNotFoundError:
            return []

    def remove_stale_tmp(self, now: float) -> list[str]:
        """Drop staging files of front doors that died long ago (a live writer's are recent).
        Only files and links: anything else in tmp/ was put there by someone else."""
        stale = []
        for entry in os.scandir(self.path(TMP)):
            try:
                if not entry.is_dir(follow_symlinks=False) and \
                        entry.stat(follow_symlinks=False).st_mtime < now - STALE_TMP_SECONDS:
                    os.unlink(entry.path)
                    stale.append(entry.name)
            except OSError:
                pass
        return stale

    def remove_own_staging(self, queue_ids: Iterable[str] | None = None) -> list[str]:
        """Drop the daemon's own staging files (`tmp/ID.QUEUE`) of the given messages, or of all
        messages when none are given: left by a worker killed while rewriting, they are a full copy
        of a message that is still safe in its queue. Front doors' `tmp/ID` files are not touched."""
        wanted = None if queue_ids is None else set(queue_ids)
        removed = []
        for name in self.list(TMP):
            queue_id, dot, queue = name.partition(".")
            if dot and queue in QUEUES and is_queue_id(queue_id) and (wanted is None or queue_id in wanted):
                try:
                    os.unlink(self.path(TMP, name))
                    removed.append(name)
                except OSError:
                    pass
        return removed

    def ids(self, queue: str) -> list[str]:
        """The queue ids in a queue directory: the messages it holds, whatever else lies there."""
        return [name for name in self.list(queue) if is_queue_id(name)]

    def counts(self) -> dict[str, dict[str, float | int | None]]:
        """Messages per queue and the arrival of the oldest, read from the ids alone."""
        result: dict[str, dict[str, float | int | None]] = {}
        for queue in QUEUES[1:]:
            ids = self.ids(queue)
            result[queue] = {"messages": len(ids), "oldest": arrival_of(min(ids)) if ids else None}
        return result
