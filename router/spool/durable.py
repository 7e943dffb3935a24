"""Writing files so that they survive a crash: the few system calls every writer needs."""

from __future__ import annotations

import errno
import grp
import os


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_synced(path: str, data: bytes, *, exclusive: bool = False, mode: int = 0o600, owner: int = -1) -> None:
    """Write `data` as the whole content of `path` and fsync it; on failure remove the file.

    `mode` is set exactly, whatever the umask: a spool shared with a group needs its files
    group-writable, or the daemon could not append to a file a front door wrote. `owner`, a uid,
    gives the file away (root queuing into a spool that belongs to the daemon's user)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
        if owner >= 0:
            os.fchown(fd, owner, -1)
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    """Remove a file that may already be gone; cleanup must not hide the error that caused it."""
    try:
        os.unlink(path)
    except OSError:
        pass


def error_name(exc: OSError) -> str:
    """The errno name of a failure (ENOSPC), one word for a report line or a log; EIO if none."""
    return errno.errorcode.get(exc.errno or 0, "EIO")


def make_shared_dir(path: str, group: str = "") -> None:
    """Make a directory of the spool: 0700, or 2770 owned by `group` so that other users of that
    group (a front door such as qpsmtpd, an administrator reading logs) can use it."""
    os.makedirs(path, exist_ok=True)
    if group:  # before the mode: a change of group by its owner clears set-group-id
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    os.chmod(path, 0o2770 if group else 0o700)
