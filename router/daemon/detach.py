"""Going into the background the way a mail daemon should: the command that starts it returns
only once the daemon serves (exit 0) or has failed to start (exit 1, with the reason), so a
caller such as the qpsmtpd plugin or an init script knows the truth."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn


def detach() -> Callable[[str | None], None]:
    """Fork into a new session; returns, in the daemon, the function that reports readiness.
    Each process's part is a function of its own, begun after the fork that made it."""
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:
        _wait_for_the_daemon(read_fd, write_fd)
    return _leave_the_session(read_fd, write_fd)


def _wait_for_the_daemon(read_fd: int, write_fd: int) -> NoReturn:
    """The command that was started: exit 0 once the daemon serves, 1 with its reason if not."""
    os.close(write_fd)
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        answer += chunk
    if answer == b"ok\n":
        os._exit(0)
    sys.stderr.write(answer.decode(errors="replace").strip() or "qrouter: the daemon died while starting")
    sys.stderr.write("\n")
    os._exit(1)


def _leave_the_session(read_fd: int, write_fd: int) -> Callable[[str | None], None]:
    """The first child: a session of its own, whose leader exits so that the daemon it forks can
    never get a controlling terminal."""
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    return _in_the_background(write_fd)


def _in_the_background(write_fd: int) -> Callable[[str | None], None]:
    """The daemon: no working directory to hold a mount, no terminal on its standard streams."""
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

    def ready(error: str | None) -> None:
        os.write(write_fd, b"ok\n" if error is None else f"qrouter: {error}\n".encode())
        os.close(write_fd)

    return ready
