"""The delivery worker: a forked process that takes queue ids from its pipe, delivers many
messages at once, and answers one report line for each.

Concurrency inside a worker is a set of session threads (at most `max-sessions` shared out over
the workers): each takes the next message from the pipe and makes one whole attempt with the same
synchronous code as ever (claim, route, deliver, journal, file away), so the journal and the claim
by rename stay exactly as strong. A thread waits on the network with the interpreter lock
released, which is all that delivery at internet latency needs: hundreds of milliseconds per
reply, microseconds of Python per reply. Threads are started as messages need them, not all at
once: a worker allowed 500 sessions that never has more than 20 messages in flight runs 20
threads, and each message goes to one of the few that just ran (warm in the caches), not to the
next of hundreds (README.md, Performance, says what that was worth).

The main thread only reads the pipe, hands messages to the threads, and says it is alive (an empty
line every HEARTBEAT_SECONDS) whatever the deliveries are doing, so the supervisor can tell a
worker that stopped answering (frozen, wedged) from one that is busy.

It holds no state the supervisor needs: if it dies, the supervisor puts its messages back and
forks another. It exits when its pipe closes (graceful stop, reload), after the deliveries in
progress, without starting those not begun (they are still in their queue), and it is killed by
the kernel when the supervisor dies, so no orphan keeps delivering beside a restarted daemon.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import resource
import select
import signal
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from policy.destinations import DestinationRules
from policy.next_hop import LMTP, MDA, MX, PIPE, SMTP
from policy.routing import Policy
from router.config import Config, privileges
from router.spool import Spool
from workers import command, tls_reports
from workers.delivery import Delivery, Plan, Report
from workers.local import ProgramTransport
from workers.pools import LOCAL
from workers.smtp import SMTPTransport
from workers.transport import Transports

log = logging.getLogger("qrouter")

SESSION_STACK = 1 << 20  # a session thread's stack: Python frames live on the heap; 8 MB is for C code
SWITCH_INTERVAL = 0.05  # how long a busy thread may keep the interpreter lock when another asks: fewer
# forced handoffs (each a futex round trip) between threads that drop it at every system call anyway
HEARTBEAT_SECONDS = 1.0  # how often the worker says it is alive, and an idle one drops idle connections
SITE_THREADS = 8  # a network worker's threads that look up sites (MX rollup) and domains (recipient
# verification): one slow DNS answer holds up one
SITE, DOMAIN, CALLOUT = "site", "domain", "callout"  # what a lookup thread is asked: an MX destination's site,
# a domain's hosts, a next hop's answer to a recipient; or to send the TLS reports of days over
TLS_REPORT = tls_reports.ASK
HANG_SECONDS = 30.0  # a program still running this long past command-time-limit has defeated the kill:
# the worker stops saying it is alive, and the supervisor's watchdog replaces it
PR_SET_PDEATHSIG = 1


def build_transports(config: Config, pool: str = "", rules: DestinationRules | None = None) -> Transports:
    """One instance of each delivery method, by next-hop kind, for the life of a worker: a local
    worker has pipes and local agents, a network worker the rest (SMTP, LMTP and MX routing share
    one), and each `queue/NAME` comes from the entry point group qrouter.transports (the built-ins
    included)."""
    if pool == LOCAL:
        program = ProgramTransport(config)
        return Transports(config, {PIPE: program, MDA: program})
    smtp = SMTPTransport(config, rules)
    return Transports(config, {SMTP: smtp, LMTP: smtp, MX: smtp})


class Worker:
    def __init__(self, task_fd: int, report_fd: int, config: Config, policy: Policy, pool: str, sessions: int):
        self.task_fd = task_fd
        self.report_fd = report_fd
        self.config = config
        self.pool = pool
        self.session_count = sessions
        self.spool = Spool(config.queue_dir, config.spool_group)
        self.transports = build_transports(config, pool, policy.destinations)
        self.delivery = Delivery(self.spool, config, policy, self.transports, pool)
        self.hang_logged = False
        self.beaten = 0.0  # when _beat last ran
        self.short_of_threads = False  # said once that a session thread could not start
        smtp = self.transports.get(SMTP)
        self.smtp = smtp if isinstance(smtp, SMTPTransport) else None  # keeps connections open: network workers
        self.tasks: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self.report_lock = threading.Lock()
        self.busy_lock = threading.Lock()
        self.busy = 0  # threads in an attempt
        self.idle = 0  # session threads waiting for a task that none has been handed to yet
        self.closing = False  # the pipe is closed or SIGTERM came: start nothing new
        self.sessions: list[threading.Thread] = []  # started as tasks need them (_hand)
        self.lookups: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()  # (SITE, entry), (DOMAIN,
        # name), (CALLOUT, {"key": ..., "recipient": ...})
        self.policy = policy
        self.site_threads: list[threading.Thread] = []  # started with the first lookup

    def start(self, supervisor_pid: int) -> None:
        """Everything that can keep a worker from working at all (the supervisor stops the
        daemon rather than fork workers that fail here again and again). The privileges change
        first: a change of credentials clears the parent-death signal."""
        if self.pool == LOCAL:
            privileges.for_local_worker()
        else:
            privileges.for_network_worker()
        _die_with_parent()
        if os.getppid() != supervisor_pid:
            raise RuntimeError("the supervisor is gone")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)
        threading.stack_size(SESSION_STACK)
        sys.setswitchinterval(SWITCH_INTERVAL)
        _check_address_space(self.session_count)

    def serve(self) -> None:
        """Deliver until the pipe closes; then finish what is in progress, still saying it is
        alive, and let go of kept connections: the idle ones at once (and say so, for the
        workers that replace this one after a reload), the others when their deliveries end."""
        try:
            self._read_tasks()
        finally:
            self.closing = True
            for _ in self.sessions:
                self.tasks.put(None)
            for _ in self.site_threads:
                self.lookups.put(None)
            if self.smtp:
                self.smtp.close()
                self._tell_kept(set(self.smtp.destination_of.values()))
            for thread in self.sessions:
                while thread.is_alive():
                    thread.join(HEARTBEAT_SECONDS)
                    self._beat()
            for transport in set(self.transports.values()):
                transport.close()

    def _read_tasks(self) -> None:
        """Read the pipe until the supervisor closes it (stop, reload) or SIGTERM says stop."""
        buffer = b""
        while not self.closing:
            readable = select.select([self.task_fd], [], [], HEARTBEAT_SECONDS)[0]
            if readable:
                chunk = os.read(self.task_fd, 65536)
                if not chunk:
                    return
                *lines, buffer = (buffer + chunk).split(b"\n")
                promised: set[str] = set()
                for line in lines:
                    task = json.loads(line)
                    if "lookup" in task:  # the dispatcher asks which sites these MX domains are in
                        self._start_site_threads()
                        for entry in task["lookup"]:
                            self.lookups.put((SITE, entry))
                    elif "verify" in task:  # recipient verification asks whether these domains take mail
                        self._start_site_threads()
                        for domain in task["verify"]:
                            self.lookups.put((DOMAIN, domain))
                    elif "callout" in task:  # ... or whether the next hop takes these recipients
                        self._start_site_threads()
                        for probe in task["callout"]:
                            self.lookups.put((CALLOUT, probe))
                    elif TLS_REPORT in task:  # the TLS reports of days over (workers/tls_reports.py)
                        self._start_site_threads()
                        self.lookups.put((TLS_REPORT, None))
                    elif "drop" in task:  # the dispatcher wants room at these destinations
                        self._beat()  # before QUITs that may wait CLOSE_SECONDS (see below)
                        if self.smtp:
                            with self.report_lock:  # no report says a connection is gone while it says QUIT
                                self.smtp.drop(set(task["drop"]))
                        self._tell_kept(set(task["drop"]))
                    else:
                        if self.smtp and "number" in task:  # before any count that could miss it
                            self.smtp.read_task(task["number"], task.get("reuse", ()))
                            promised.update(task.get("reuse", ()))
                        self._hand(task)
                if promised:  # the dispatcher counts a promise twice until it hears it was read
                    self._write({}, promised)
            elif not self.busy:
                # the QUITs may wait CLOSE_SECONDS: after a second of select, that silence would
                # reach the supervisor's TAKE_BACK_SECONDS unless this says "alive" first
                self._beat()
                for transport in set(self.transports.values()):
                    if transport is not self.smtp:
                        transport.close_idle()
                if self.smtp:
                    self._tell_kept(self.smtp.close_idle())
            if time.monotonic() - self.beaten >= HEARTBEAT_SECONDS:
                self._beat()

    def _hand(self, task: dict) -> None:
        """Give a task to a session thread: one waiting with nothing handed to it yet, or a new
        one while the worker has fewer than its sessions (the supervisor never sends more tasks
        than that, so a task never waits behind another delivery)."""
        with self.busy_lock:
            waiting = self.idle > 0
            if waiting:
                self.idle -= 1
        if not waiting and len(self.sessions) < self.session_count:
            thread = threading.Thread(target=self._session, name=f"session-{len(self.sessions)}", daemon=True)
            try:
                thread.start()
                self.sessions.append(thread)
            except RuntimeError as exc:  # out of threads (pids.max, threads-max): it waits for a thread to finish
                if not self.short_of_threads:
                    self.short_of_threads = True
                    log.error("worker %d: cannot start session thread %d of %d (%s); its messages wait for "
                              "the threads it has: lower max-sessions or raise the system's limit",
                              os.getpid(), len(self.sessions) + 1, self.session_count, exc)
        self.tasks.put(task)

    def _start_site_threads(self) -> None:
        """The threads that find sites for MX rollup and answer recipient verification, so no
        delivery waits behind DNS."""
        if self.smtp and not self.site_threads:
            self.site_threads = [threading.Thread(target=self._look_up_sites, name=f"sites-{n}", daemon=True)
                                 for n in range(SITE_THREADS)]
            for thread in self.site_threads:
                thread.start()

    def _session(self) -> None:
        """One session thread: attempt messages one after the other until told to stop. A
        message handed out but not begun when the worker closes is left alone: it is still in
        its queue, and the supervisor gives it to another worker."""
        while (task := self.tasks.get()) is not None:
            report = None if self.closing else self._attempt(task)
            with self.busy_lock:  # before the report, which frees the session for the next task
                self.idle += 1
            if report is not None:
                self._write(report.to_record(), report.reach)

    def _attempt(self, task: dict) -> Report:
        with self.busy_lock:
            self.busy += 1
        if self.smtp:
            self.smtp.begin(task.get("reuse", ()))
        try:
            return self.delivery.attempt(task["queue"], task["id"], task.get("states", ""), Plan.from_record(task))
        finally:
            if self.smtp:
                self.smtp.end()
            with self.busy_lock:
                self.busy -= 1

    def _look_up_sites(self) -> None:
        """Answer the supervisor's lookups, one record each, until told to stop: the site of an MX
        destination, what DNS says of a domain now (None: hosts to try; else [code, text]), or
        what a next hop answers to a recipient (a callout: [code, text])."""
        assert self.smtp is not None
        while (lookup := self.lookups.get()) is not None:
            kind, entry = lookup
            if kind == SITE:
                self._write({"sites": {entry: self.smtp.site_of(unquote(entry).partition(":")[2])}})
            elif kind == DOMAIN:
                self._write({"domains": {entry: self.smtp.mx_failure(entry)}})
            elif kind == TLS_REPORT:
                self._send_tls_reports()
            else:
                self._write({"callouts": {entry["key"]: self._callout(entry["recipient"])}})

    def _callout(self, recipient: str) -> tuple[str, str]:
        """The next hop's answer to `recipient`, routed as delivery routes it; never raises."""
        assert self.smtp is not None
        try:
            hop = self.policy.route_queued(recipient, rewritten=True).next_hop  # rewritten by the supervisor
            return self.smtp.probe(hop, recipient, self.config.verify_sender)
        except Exception as exc:  # a bug must not end the thread: the client hears "temporary"
            log.exception("probe of <%s> failed", recipient)
            return "4.3.0", f"probe failed: {type(exc).__name__}: {exc}"

    def _send_tls_reports(self) -> None:
        """Send the TLS reports of the days over, unless another sender is at it; never raises."""
        try:
            tls_reports.Sender(self.config, self.spool).send(wait=False)
        except Exception:  # a bug, or a spool that cannot be written: the next trigger tries again
            log.exception("sending TLS reports failed")

    def _tell_kept(self, destinations: set[str]) -> None:
        """Tell the dispatcher how many idle connections are left to destinations that lost some."""
        if destinations:
            self._write({"kept": dict.fromkeys(destinations, 0)}, destinations)

    def _beat(self) -> None:
        """Say "alive" (an empty line); a supervisor that is gone takes this worker with it. A
        program that outlives its time limit by far (one the kill could not stop) is a hang: the
        worker falls silent, so that the supervisor replaces it."""
        self.beaten = time.monotonic()
        running = command.longest_run()
        if running > self.config.command_time_limit + HANG_SECONDS:
            if not self.hang_logged:
                self.hang_logged = True
                log.error("worker %d: a program has run for %.0fs, beyond command-time-limit; "
                          "no longer saying it is alive", os.getpid(), running)
            return
        try:
            self._write(None)
        except OSError:
            pass

    def _write(self, record: dict | None, destinations: Iterable[str] = ()) -> None:
        """Write a record (None: an empty line, "alive"), with the idle connections kept to
        `destinations` and the number of the last task read, counted as it is written: records
        reach the dispatcher in the order they were counted, so an older count never overwrites a
        newer one. The lock also keeps a long record, more than one atomic pipe write, whole."""
        with self.report_lock:
            if record is not None and destinations and self.smtp:
                record["kept"], record["read"] = self.smtp.kept_counts(destinations)
            if record is not None and self.smtp and self.smtp.tls_sessions:
                record["tls"] = self.smtp.take_tls_sessions()
            os.write(self.report_fd, b"\n" if record is None else json.dumps(record).encode() + b"\n")

    def _on_term(self, signum: int, frame: object) -> None:
        """SIGTERM: finish the deliveries in progress, start no other, then exit."""
        if not self.busy:
            os._exit(0)
        self.closing = True


def _check_address_space(sessions: int) -> None:
    """Session threads start as they are needed; a limit on address space that cannot hold all
    their stacks would only show when the mail comes, so it stops the worker now."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    need = sessions * SESSION_STACK
    if limit != resource.RLIM_INFINITY and need > limit // 2:  # the other half: the heap, libraries
        raise RuntimeError(f"{sessions} session threads need {need >> 20} MB of address space for their "
                           f"stacks, more than half of the limit (RLIMIT_AS) of {limit >> 20} MB: "
                           f"lower max-sessions or raise the limit")


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
