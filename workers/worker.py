"""The delivery worker: a forked process that takes queue-file paths from its pipe, delivers,
and answers one report line each.

It holds no state the supervisor needs: if it dies, the supervisor puts its message back and
forks another. It exits when its pipe closes (graceful stop, reload) and is killed by the kernel
when the supervisor dies, so no orphan keeps delivering beside a restarted daemon.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal

from policy.next_hop import DISCARD, ERROR, LMTP, MAILDIR, MDA, MX, PIPE, RETRY, SMTP
from policy.routing import Policy
from router.config import Config
from router.spool import Spool
from workers.delivery import Delivery
from workers.maildir import MaildirTransport
from workers.smtp import SMTPTransport
from workers.transport import Transport
from workers.verdict import VerdictTransport

log = logging.getLogger("qrouter")

IDLE_SECONDS = 1.0  # how often an idle worker lets transports drop what they hold open
PR_SET_PDEATHSIG = 1


def build_transports(config: Config) -> dict[str, Transport]:
    """One instance of each delivery method, by next-hop kind, for the life of a worker."""
    verdict = VerdictTransport()
    smtp = SMTPTransport(config)
    return {MAILDIR: MaildirTransport(), DISCARD: verdict, ERROR: verdict, RETRY: verdict,
            SMTP: smtp, LMTP: smtp, MX: smtp, PIPE: verdict, MDA: verdict}


class Worker:
    def __init__(self, task_fd: int, report_fd: int, config: Config, policy: Policy):
        self.task_fd = task_fd
        self.report_fd = report_fd
        self.config = config
        self.spool = Spool(config.queue_dir, config.spool_group)
        self.transports = build_transports(config)
        self.delivery = Delivery(self.spool, config, policy, self.transports)
        self.busy = False
        self.stopping = False

    def run(self, supervisor_pid: int) -> None:
        _die_with_parent()
        if os.getppid() != supervisor_pid:
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            self._serve()
        finally:
            for transport in set(self.transports.values()):
                transport.close()

    def _serve(self) -> None:
        """One message at a time, as the supervisor hands them out (up to PREFETCH ahead, so a
        busy worker finds the next one waiting and waits only when there is none).

        Before each message the pipe is read to its end: once the supervisor has closed it (stop,
        reload), the worker takes no new message, not even one already handed out; that one is
        still in its queue for another worker or the next start. SIGTERM stops it the same way.
        """
        buffer = b""
        os.set_blocking(self.task_fd, False)
        while not self.stopping:
            try:
                while chunk := os.read(self.task_fd, 4096):
                    buffer += chunk
                return  # end of file: closed by the supervisor
            except BlockingIOError:
                pass
            line, found, buffer = buffer.partition(b"\n")
            if not found:
                buffer = line
                if not select.select([self.task_fd], [], [], IDLE_SECONDS)[0]:
                    for transport in set(self.transports.values()):
                        transport.close_idle()
                continue
            queue, queue_id, *states = line.decode().split()
            self.busy = True
            report = self.delivery.attempt(queue, queue_id, *states)
            self.busy = False
            os.write(self.report_fd, report.to_line())

    def _on_term(self, signum: int, frame: object) -> None:
        """SIGTERM: finish the message in hand, then exit."""
        if not self.busy:
            os._exit(0)
        self.stopping = True


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
