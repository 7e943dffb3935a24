"""Opening a file that someone else may have put where it is: queue files, journal records, log
files in a group-writable directory, policy files. One way for all of them:

- a symbolic link is not followed (unless the caller trusts links: policy files may be links
  into /etc, which only root writes);
- a FIFO or device is never waited on (O_NONBLOCK), a terminal never becomes ours (O_NOCTTY),
  and no descriptor leaks into a program a worker starts (O_CLOEXEC);
- anything but a regular file is refused by NotARegularFile, which says what it is instead;
- reads are bounded: read_at_most never takes more than its limit, whatever the file claims.
"""

from __future__ import annotations

import os
import stat

GUARDED = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"))


class NotARegularFile(OSError):
    """The path names something that is not a regular file; `kind` says what."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path}: {kind}, not a regular file")
        self.kind = kind


def kind_of(mode: int) -> str:
    """What a file of `mode` is, in words: "a FIFO", "a directory", ..."""
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def open_regular(path: str, flags: int = os.O_RDONLY, mode: int = 0o600, *,
                 follow_links: bool = False) -> tuple[int, os.stat_result]:
    """A descriptor of the regular file at `path` and its fstat, opened with `flags` (and `mode`
    for a file O_CREAT makes). OSError as os.open raises it (ELOOP for a link, ENXIO for a socket
    or a FIFO without a reader opened for writing), NotARegularFile for the rest."""
    fd = os.open(path, flags | (GUARDED & ~os.O_NOFOLLOW if follow_links else GUARDED), mode)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(path, kind_of(info.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_at_most(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from `fd`, read until its end or the limit, whichever comes first."""
    chunks = []
    while limit > 0:
        chunk = os.read(fd, min(limit, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)
