"""Logging in the shape mail administrators know: `qrouter[pid]: QUEUEID: ...`, with
`warning:` and `error:` prefixes as Postfix writes them; to stderr, syslog (facility mail) or
a file."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)  # a worker's lines carry its own pid, asked once, not per line


class _Formatter(logging.Formatter):
    _stamp: tuple[int, str] = (-1, "")  # (second, its text), one tuple so threads see a matching pair

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.prefix = _PREFIX.get(record.levelno, "")
        record.process = _pid
        return super().formatMessage(record)

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
