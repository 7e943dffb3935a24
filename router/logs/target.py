"""Logging in the shape Postfix's log readers know: `HOST qrouter/SERVICE[pid]: QUEUEID: ...`,
with `warning:` and `error:` prefixes as Postfix writes them; to stderr, syslog (facility mail) or
a file.

SERVICE names what speaks, as Postfix's program names do (pflogsumm and logwatch sort lines by
it): the logger `qrouter.NAME` speaks as NAME (router/logs/lines.py has them), `qrouter` itself as
`master`. The file and stderr logs begin as syslog writes a line: the time stamp (`Dec  6
18:53:17`, the day padded with a space; or RFC 3339 with `log-time rfc3339`) and the short host
name; with syslog, the syslog daemon puts those in front.

Every log call is one line, whatever its text holds: addresses (UTF-8 is valid in them), replies
of other servers and file names come from outside, and a line break in them (CR, LF, U+2028,
U+0085, a vertical tab...) would let them forge log lines. So every character str.isprintable()
refuses (controls, format characters, line and paragraph separators, lone surrogates) is written
as Python would escape it: \\n, \\x85, \\u2028. A traceback after the message stays as it is.

A file log is opened through a WatchedFileHandler: every process (the supervisor and each forked
worker) sees at its next line that the file was moved or removed (logrotate) and opens a new one,
so no signal is needed; the supervisor also reopens its own at once on SIGUSR1 (`reopen()`).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import socket
import stat
import sys
import time

from router.spool.durable import make_shared_dir
from router.spool.files import open_regular

_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}
_pid = os.getpid()
_NOT_ASCII_PRINTABLE = re.compile(r"[^\x20-\x7e]")  # where an unprintable character may be
MASTER = "master"  # the service of lines of the `qrouter` logger itself
SYSLOG_TIME, RFC3339_TIME = "syslog", "rfc3339"
TIME_FORMATS = (SYSLOG_TIME, RFC3339_TIME)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")  # not the locale's


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)  # a worker's lines carry its own pid, asked once, not per line


def one_line(text: str) -> str:
    """`text` with every unprintable character escaped (`\\u2028`), so it is one line and shows
    what it holds. The common line is all printable, which a C-level test tells; only the others
    are searched character by character."""
    if text.isprintable():
        return text
    return _NOT_ASCII_PRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return char if char.isprintable() else repr(char)[1:-1]


class _Formatter(logging.Formatter):
    """One line per record: `qrouter/SERVICE[PID]: ` and the message, after the time stamp and
    host name when `stamped` (the file and stderr logs)."""

    _stamp: tuple[int, str, str] = (-1, "", "")  # (second, text before and after its fraction), one tuple for threads

    def __init__(self, stamped: bool, time_format: str = SYSLOG_TIME) -> None:
        head = "%(asctime)s %(hostname)s " if stamped else ""
        super().__init__(head + "qrouter/%(service)s[%(process)d]: %(prefix)s%(message)s")
        self.rfc3339 = time_format == RFC3339_TIME
        self.hostname = (socket.gethostname().partition(".")[0] or "localhost") if stamped else ""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line without a traceback (format() appends that): escaped to stay one line."""
        record.prefix = _PREFIX.get(record.levelno, "")
        record.process = _pid
        record.service = record.name[len("qrouter."):] if record.name.startswith("qrouter.") else MASTER
        record.hostname = self.hostname
        return one_line(super().formatMessage(record))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The time stamp as syslog writes it, the second's text made once a second: localtime()
        and strftime() were a good part of what a line cost, and a busy worker logs several a message.
        RFC 3339 adds the microseconds, as rsyslog writes them, between the second and the zone."""
        second = int(record.created)
        if self._stamp[0] != second:
            self._stamp = (second, *_second_text(second, self.rfc3339))
        if not self.rfc3339:
            return self._stamp[1]
        return f"{self._stamp[1]}.{int((record.created - second) * 1e6):06d}{self._stamp[2]}"


def _second_text(second: int, rfc3339: bool) -> tuple[str, str]:
    """A second in local time: `Dec  6 18:53:17` (syslog's, the day padded with a space), or
    `2026-12-06T18:53:17` and the zone, `+01:00`, for RFC 3339."""
    local = time.localtime(second)
    clock = time.strftime("%H:%M:%S", local)
    if not rfc3339:
        return f"{_MONTHS[local.tm_mon - 1]} {local.tm_mday:2d} {clock}", ""
    offset = abs(local.tm_gmtoff) // 60
    zone = f"{'-' if local.tm_gmtoff < 0 else '+'}{offset // 60:02d}:{offset % 60:02d}"
    return time.strftime("%Y-%m-%dT", local) + clock, zone


SYSLOG_SOCKET = "/dev/log"
_where = "stderr"  # where the lines go now: "syslog", "stderr" or a file path (`qrouter status` shows it)


def where() -> str:
    return _where


def choose(target: str, fallback_file: str | None = None) -> str:
    """Where `target` ("stderr", "syslog" or a file path) really sends the lines: "syslog" without
    a syslog socket becomes `fallback_file`, or stderr when there is none."""
    if target == "syslog" and not os.path.exists(SYSLOG_SOCKET):
        return fallback_file or "stderr"
    return target


def prepare_file(path: str, group: str = "") -> None:
    """Make the fallback log's directory as the queue directories are made (0700, or 2770 owned by
    `group`), and the file 0600 (0660 with a group); raises OSError if it cannot be written."""
    parent = os.path.dirname(path)
    os.makedirs(os.path.dirname(parent) or ".", mode=0o700, exist_ok=True)  # the queue dir, if new
    make_shared_dir(parent, group)
    os.close(_open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o660 if group else 0o600))


def _open_file(path: str, flags: int, mode: int) -> int:
    """Open a log file; a new one gets `mode` whatever the umask. The log directory may be
    writable by the spool group, so a symbolic link, FIFO or device there is refused."""
    fd, info = open_regular(path, flags, mode)
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != mode:
        os.fchmod(fd, mode)
    return fd


class _FileHandler(logging.handlers.WatchedFileHandler):
    """A WatchedFileHandler whose new files (after a rotation) get `file_mode`, not the umask's."""

    def __init__(self, path: str, file_mode: int | None) -> None:
        self.file_mode = file_mode
        super().__init__(path, encoding="utf-8", errors="backslashreplace")

    def emit(self, record: logging.LogRecord) -> None:
        """A file that cannot be opened again (its directory removed, a link put in its place)
        loses this line, as a full disk would, and is tried again at the next: a log call never
        raises into the daemon."""
        try:
            self.reopenIfNeeded()
            if self.stream is None:
                self.stream = self._open()
        except Exception:
            self.handleError(record)
            return
        super().emit(record)

    def _open(self):
        if self.file_mode is None:
            return super()._open()
        return open(self.baseFilename, "a", encoding=self.encoding, errors=self.errors,
                    opener=lambda path, flags: _open_file(path, flags, self.file_mode))


def setup(target: str, fallback_file: str | None = None, group: str = "",
          time_format: str = SYSLOG_TIME) -> logging.Logger:
    """Send the `qrouter` logger to `target`: "stderr", "syslog" or a file path. Without a
    syslog socket (/dev/log), "syslog" falls back to `fallback_file` (made by prepare_file(),
    mode 0600, or 0660 with `group`) or, without one, to stderr, and says so. `time_format`
    (SYSLOG_TIME or RFC3339_TIME) is the file's and stderr's time stamp."""
    global _where
    # Per record, logging looks up the caller's file and line, the thread, the process and its name;
    # no line shows them, so skip the work (the logging manual's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    logger = logging.getLogger("qrouter")
    for old in logger.handlers:
        if isinstance(old, logging.FileHandler):
            old.close()
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    chosen = choose(target, fallback_file)
    fallback = f"no syslog ({SYSLOG_SOCKET}), logging to {chosen}" if chosen != target else ""
    if chosen == "syslog":
        handler: logging.Handler = logging.handlers.SysLogHandler(
            SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(_Formatter(stamped=False))
    else:
        if chosen == "stderr":
            handler = logging.StreamHandler(sys.stderr)
        else:
            if chosen == fallback_file:
                prepare_file(chosen, group)
            handler = _FileHandler(chosen, (0o660 if group else 0o600) if chosen == fallback_file else None)
        handler.setFormatter(_Formatter(stamped=True, time_format=time_format))
    logger.addHandler(handler)
    _where = chosen
    if fallback:
        logger.warning(fallback)
    return logger


def reopen() -> None:
    """Reopen a file log now (SIGUSR1 after logrotate moved it); nothing for syslog or stderr."""
    for handler in logging.getLogger("qrouter").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream:
                    handler.stream.close()
                handler.stream = None
                handler.stream = handler._open()
                if isinstance(handler, logging.handlers.WatchedFileHandler):
                    handler._statstream()
            except OSError:
                pass  # the next line tries again (_FileHandler.emit), and never kills the daemon
            finally:
                handler.release()
