"""Logging in the shape mail administrators know: `qrouter[pid]: QUEUEID: ...`, with
`warning:` and `error:` prefixes as Postfix writes them; to stderr, syslog (facility mail) or
a file.

Every log call is one line, whatever its text holds: addresses (UTF-8 is valid in them), replies
of other servers and file names come from outside, and a line break in them (CR, LF, U+2028,
U+0085, a vertical tab...) would let them forge log lines. So every character str.isprintable()
refuses (controls, format characters, line and paragraph separators, lone surrogates) is written
as Python would escape it: \\n, \\x85, \\u2028. A traceback after the message stays as it is.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys

_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}
_pid = os.getpid()
_NOT_ASCII_PRINTABLE = re.compile(r"[^\x20-\x7e]")  # where an unprintable character may be


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
    _stamp: tuple[int, str] = (-1, "")  # (second, its text), one tuple so threads see a matching pair

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line without a traceback (format() appends that): escaped to stay one line."""
        record.prefix = _PREFIX.get(record.levelno, "")
        record.process = _pid
        return one_line(super().formatMessage(record))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The time stamp has no fraction of a second, so it is made once a second: localtime()
        and strftime() were a good part of what a line cost, and a busy worker logs two a message."""
        second = int(record.created)
        if self._stamp[0] != second:
            self._stamp = (second, super().formatTime(record, datefmt))
        return self._stamp[1]


def setup(target: str) -> logging.Logger:
    """Send the `qrouter` logger to `target`: "stderr", "syslog" or a file path. Without a
    syslog socket (/dev/log), "syslog" falls back to stderr and says so."""
    # Per record, logging looks up the caller's file and line, the thread, the process and its name;
    # no line shows them, so skip the work (the logging manual's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    logger = logging.getLogger("qrouter")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fallback = ""
    if target == "syslog" and os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(
            "/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(_Formatter("qrouter[%(process)d]: %(prefix)s%(message)s"))
    else:
        fallback = "no /dev/log, logging to stderr" if target == "syslog" else ""
        stream = sys.stderr if target in ("stderr", "syslog") else open(target, "a", buffering=1)
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_Formatter("%(asctime)s qrouter[%(process)d]: %(prefix)s%(message)s",
                                        "%b %d %H:%M:%S"))
    logger.addHandler(handler)
    if fallback:
        logger.warning(fallback)
    return logger
