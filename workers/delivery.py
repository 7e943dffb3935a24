"""One delivery attempt of one message: claim, route, deliver, record, and file it away.

This is the whole life of a message inside a worker. Each recipient is routed afresh, recipients
sharing a next hop go out together, and after each next hop the results are journalled (fsynced)
before the next one is tried, so a crash never delivers twice to a recipient already done.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields, replace

from policy.next_hop import MX, SMTP, NextHop
from policy.routing import Policy
from router.config import Config
from router.logs.lines import CLEANUP, QMGR, Delays, delivery, logger, service_of, taken_in
from router.spool import ACTIVE, ARCHIVE, CORRUPT, DEFERRED, INCOMING, NotAQueueFile, Spool, read_queue_file
from router.spool.durable import error_name
from router.spool.headers import prepend_fields
from router.spool.queue_file import (
    DELIVERED,
    FAILED,
    MAX_OVERHEAD,
    PENDING,
    POISON_CRASHES,
    CorruptQueueFile,
    QueueFile,
    Recipient,
    parse,
)
from router.spool.queue_id import new_queue_id
from router.spool.trace import arrival_field
from workers.delivery_fields import LOOP_DSN, hop_count
from workers.notify import Notifier
from workers.pools import LOCAL, NETWORK, pool_of
from workers.report import DELIVERED as REPORT_DELIVERED
from workers.report import RELAYED, SUCCESS, Notice, wants
from workers.transport import BOUNCED, SENT, Outcome, Transport
from workers.transport import DEFERRED as STATUS_DEFERRED

log = logger(QMGR)

REMOVED, QUEUED_AGAIN, ARCHIVED, SKIPPED, CORRUPTED = "removed", "deferred", "archived", "skipped", "corrupt"
KEPT = "kept"  # its state could not be stored: left where it is, its results told to the supervisor
HELD = "held"  # poison: its file counts POISON_CRASHES workers it killed; moved to hold/, not delivered
UNREACHABLE = "4.4."  # the enhanced status class of "no answer": connection refused, timed out, lost
KEPT_RETRY_SECONDS = 60.0  # a kept message is tried again this soon at most: space may be back
SUMMARY = "attempt"  # the word the history entry _defer writes after an attempt begins with


@dataclass
class Report:
    """What a worker tells the supervisor about one message, as one JSON record a line over its pipe.

    A KEPT message is in `queue` still, and `states` holds the results of recipients done
    that its file does not record yet; `error` names the errno of a failure to store (ENOSPC),
    which the supervisor logs once a minute rather than once per message. `reach` says for each
    destination tried whether it could be reached (""), or why not (no server answered), which
    the dispatcher needs to open or close its window and to find dead destinations. The worker
    adds to the record the idle connections it keeps to those destinations (workers/worker.py)."""

    queue_id: str
    result: str
    sent: int = 0
    deferred: int = 0
    bounced: int = 0
    next_attempt: float = 0.0
    queue: str = ""
    states: str = ""
    error: str = ""
    reach: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> dict:
        # vars(), not dataclasses.asdict(): that deep-copies every field, at a third of the cost of a report
        return {key: value for key, value in vars(self).items() if value or key == "result"}

    @classmethod
    def from_record(cls, record: dict) -> Report:
        return cls(**{key: record[key] for key in _REPORT_FIELDS if key in record})


_REPORT_FIELDS = [f.name for f in fields(Report)]


@dataclass
class Plan:
    """What the dispatcher asks of one attempt (router/daemon/dispatcher.py Task): the destinations to
    attempt now (None: all), those suspended (recorded as deferred without an attempt, with why
    and when to retry), those whose entries still wait for room (left untouched), and the retry
    already asked for by the entries that went earlier, in the same activation (`continued`: this
    is not a new attempt of the message, and its count stays). A recipient routed elsewhere than
    any of these (the policy changed meanwhile) is attempted."""

    go: frozenset[str] | None = None
    suspended: dict[str, tuple[str, float]] = field(default_factory=dict)
    later: frozenset[str] = frozenset()
    due: float = 0.0
    continued: bool = False

    @classmethod
    def from_record(cls, task: dict) -> Plan:
        go = task.get("go")
        return cls(None if go is None else frozenset(go),
                   {name: (why, float(due)) for name, (why, due) in task.get("suspended", {}).items()},
                   frozenset(task.get("later", ())), float(task.get("due", 0.0)), bool(task.get("continued")))


def encode_states(queue_file: QueueFile) -> str:
    """The recipients that are done, as `INDEX=STATE,...`, for a file that could not record them."""
    return ",".join(f"{index}={rcpt.state}" for index, rcpt in enumerate(queue_file.recipients)
                    if rcpt.state != PENDING)


def apply_states(queue_file: QueueFile, states: str) -> None:
    """Mark recipients done as an earlier attempt reported them (see encode_states)."""
    for item in filter(None, states.split(",")):
        index, _, state = item.partition("=")
        if state in (DELIVERED, FAILED) and index.isdigit() and int(index) < len(queue_file.recipients):
            queue_file.recipients[int(index)].state = state


@dataclass
class Retry:
    """When the recipients an attempt leaves pending want their next one: the times asked for
    (suspended destinations' probes, earlier entries of the activation), whether an attempted one
    was deferred (then the backoff applies), and whether some were left for entries that wait."""

    times: list[float]
    backoff: bool = False
    attempted: bool = False
    untouched: bool = False


class Delivery:
    def __init__(self, spool: Spool, config: Config, policy: Policy, transports: dict[str, Transport],
                 pool: str = NETWORK):
        self.spool = spool
        self.config = config
        self.policy = policy
        self.transports = transports
        self.pool = pool  # the kind of worker this is: recipients for the other kind are split off
        self.notifier = Notifier(spool, config)

    def attempt(self, queue: str, queue_id: str, states: str = "", plan: Plan | None = None) -> Report:
        """One attempt, of what `plan` asks (everything without one). `states` are results an
        earlier attempt could not store (a full disk): they are applied and stored first, so
        those recipients are not delivered twice."""
        report = Report(queue_id, REMOVED)
        path = None
        try:
            path = self.spool.claim(queue, queue_id)
            if path is None:
                return Report(queue_id, SKIPPED)
            taken = time.time()
            queue_file = parse(read_queue_file(path, self.config.message_size_limit + MAX_OVERHEAD), path)
            # A file without history is new from a front door: pickup logs who queued it (its owner)
            owner = None if queue_file.log else os.stat(path).st_uid
        except (CorruptQueueFile, NotAQueueFile) as exc:
            return self._set_aside(queue_id, exc, queue if path is None else ACTIVE)
        except OSError as exc:  # the disk, not the file: it stays where it is for later
            return self._keep(report, queue if path is None else ACTIVE, states, exc)
        if queue_file.queue_id != queue_id:
            return self._set_aside(queue_id, CorruptQueueFile(
                f"{path}: its id line says {queue_file.queue_id}, not its file name"))
        if queue_file.crashes >= POISON_CRASHES:  # counted in the file: deaths in earlier runs count too
            try:
                self.spool.hold_poison(queue_id)
            except OSError as exc:  # still in active/ with its count: never delivered, tried again later
                return self._keep(report, ACTIVE, states, exc)
            log.error("%s: poison message: it killed %d workers; moved to hold/", queue_id, queue_file.crashes)
            return Report(queue_id, HELD)
        queue_file.taken = taken
        if first_take(queue_file):
            taken_in(queue_file, owner)
        apply_states(queue_file, states)
        try:
            return self._attempt(queue_file, report, plan or Plan(), stored=not (queue_file.journal_bytes or states))
        except Exception:
            log.exception("%s: delivery attempt failed unexpectedly; recording what was done and deferring it",
                          queue_id)
            return self._defer(queue_file, report, time.time() + self.config.min_backoff)

    def _attempt(self, queue_file: QueueFile, report: Report, plan: Plan, stored: bool) -> Report:
        if not stored:
            try:
                self._store(queue_file, report)
            except OSError:
                pass  # the states stay in memory and go back in the report if they cannot be stored later
        if queue_file.attempts == 0 and not queue_file.rewritten and self.policy.rewriter.rules:
            refused = self._rewrite(queue_file, report)
            if refused is not None:
                return refused
        successes: list[Notice] = []
        retry = Retry([plan.due] if plan.due else [])
        if not self._looping(queue_file, report):
            self._deliver(queue_file, report, successes, plan, retry)
        if queue_file.pending() and time.time() - queue_file.arrival >= self.config.max_age * 86400:
            self._expire(queue_file, report)
        if not self.notifier.after_attempt(queue_file, successes):  # the report must not be lost with it
            return self._defer(queue_file, report, time.time() + min(self.config.min_backoff, KEPT_RETRY_SECONDS))
        return self._file_away(queue_file, report, retry)

    def _looping(self, queue_file: QueueFile, report: Report) -> bool:
        """A message that has passed more hops than hopcount-limit (Received: and Delivered-To:
        fields) is in a mail loop: every pending recipient fails with 5.4.6, as in Postfix."""
        count, limit = hop_count(queue_file.message), self.config.hopcount_limit
        if count <= limit:
            return False
        queue_file.attempts += 1
        loop = Outcome(BOUNCED, LOOP_DSN, f"mail loop: the message has {count} Received: and Delivered-To: header "
                                          f"fields, more than hopcount-limit {limit}", "none")
        for rcpt in queue_file.pending():
            self._record(queue_file, rcpt, loop, report)
        return True

    def _set_aside(self, queue_id: str, problem: Exception, source: str = ACTIVE) -> Report:
        """Move what is in `source` to corrupt/. What cannot be moved is left there, named in one
        line: on a CORRUPTED report the supervisor does not hand it out again (until it reads
        the queue directories anew, at the next start)."""
        kind = "corrupt queue file" if isinstance(problem, CorruptQueueFile) else "not a queue file,"
        try:
            name = self.spool.set_aside(queue_id, source)
        except OSError as exc:
            log.error("%s: %s left in %s/, it cannot be moved to corrupt/ (%s): %s", queue_id, kind, source,
                      exc.strerror or exc, problem)
        else:
            log.error("%s: %s moved to %s: %s", queue_id, kind, self.spool.path(CORRUPT, name), problem)
        return Report(queue_id, CORRUPTED)

    def _rewrite(self, queue_file: QueueFile, report: Report) -> Report | None:
        """Rewrite addresses once, before the first delivery, and make that durable first; if
        it cannot be stored, deliver nothing now rather than risk rewriting twice."""
        changes = self.policy.rewrite(queue_file)
        queue_file.rewritten = True
        try:
            self.spool.write(queue_file, ACTIVE)
        except OSError as exc:
            return self._keep(report, ACTIVE, encode_states(queue_file), exc)
        for change in changes:
            logger(CLEANUP).info("%s: %s", queue_file.queue_id, change)  # Postfix's cleanup rewrites addresses
        return None

    def _deliver(self, queue_file: QueueFile, report: Report, successes: list[Notice], plan: Plan,
                 retry: Retry) -> None:
        """Deliver to the pending recipients the plan lets go now, next hop by next hop,
        journalling between them; record the suspended ones without an attempt; note in `retry`
        when what stays pending wants its next attempt. Deliveries whose NOTIFY asks for a
        success report the next hop will not make are added to `successes`.

        If the journal cannot be written the attempt stops there: the next hops not tried yet
        keep their recipients pending rather than risk an unrecorded delivery.
        """
        groups: dict[NextHop, list[int]] = {}
        others: list[int] = []
        for index, rcpt in enumerate(queue_file.recipients):
            if rcpt.state == PENDING:
                hop = self.policy.route(rcpt.address).next_hop
                if pool_of(hop.kind) == self.pool:
                    groups.setdefault(hop, []).append(index)
                else:
                    others.append(index)
        if others and not self._split(queue_file, others, report):
            return
        for position, (hop, indexes) in enumerate(groups.items(), 1):
            recipients = [queue_file.recipients[i] for i in indexes]
            name = hop.destination
            if plan.go is not None and name not in plan.go and name in plan.suspended:
                why, due = plan.suspended[name]
                for rcpt in recipients:
                    self._record(queue_file, rcpt, Outcome(STATUS_DEFERRED, "4.4.1", why, "none"), report)
                retry.times.append(due)
                continue
            if plan.go is not None and name not in plan.go and name in plan.later:
                retry.untouched = True
                continue
            if not retry.attempted:
                retry.attempted = True
                queue_file.attempts += 0 if plan.continued else 1
            started = time.time()
            outcomes = self._outcomes(queue_file, recipients, hop)
            took = time.time() - started
            unreachable = all(o.status == STATUS_DEFERRED and o.dsn.startswith(UNREACHABLE) for o in outcomes)
            report.reach[hop.destination] = (outcomes[0].reply or "unreachable") if unreachable and outcomes else ""
            for rcpt, outcome in zip(recipients, outcomes, strict=True):
                self._record(queue_file, rcpt, outcome, report, service_of(hop.kind), took)
                retry.backoff = retry.backoff or outcome.status == STATUS_DEFERRED
                if outcome.status == SENT and not outcome.dsn_passed and wants(rcpt, SUCCESS):
                    successes.append(Notice(rcpt, RELAYED if hop.kind in (SMTP, MX) else REPORT_DELIVERED))
            if position < len(groups):
                try:
                    self.spool.journal(queue_file.queue_id, [(i, queue_file.recipients[i]) for i in indexes])
                except OSError as exc:
                    log.error("%s: cannot journal results, stopping this attempt: %s", queue_file.queue_id, exc)
                    return

    def _split(self, queue_file: QueueFile, indexes: list[int], report: Report) -> bool:
        """Move recipients the other kind of worker delivers to (workers/pools.py) into a new
        message of their own, queued in incoming/ with the same envelope and arrival, and record
        them here as forwarded, as Postfix's local(8) logs an alias expansion. False when that
        cannot be recorded: the attempt stops, and the recipients stay here, pending."""
        recipients = [queue_file.recipients[i] for i in indexes]
        part = queue_file.copy_for(new_queue_id(), queue_file.arrival, recipients)
        part.rewritten = queue_file.rewritten
        other = LOCAL if self.pool == NETWORK else NETWORK
        part.add_log(time.time(), f"split off from {queue_file.queue_id} for the {other} workers")
        try:
            self.spool.write(part, INCOMING)
        except OSError as exc:
            log.error("%s: cannot queue the recipients for %s workers separately (%s); trying them later",
                      queue_file.queue_id, other, exc.strerror or exc)
            return True
        for rcpt in recipients:
            self._record(queue_file, rcpt, Outcome(SENT, "2.0.0", f"forwarded as {part.queue_id} to the {other} "
                                                   "workers", f"{other}[{part.queue_id}]"), report)
        try:
            self.spool.journal(queue_file.queue_id, zip(indexes, recipients, strict=True))
        except OSError as exc:  # the new message exists: delivering more now could double it
            log.error("%s: cannot journal the split, stopping this attempt: %s", queue_file.queue_id, exc)
            return False
        return True

    def _traced(self, queue_file: QueueFile, hop: NextHop) -> QueueFile:
        """The message as it goes to `hop`: to the peer of a drain, with its arrival in a trace
        field first (router/spool/trace.py), so that max-age there counts from it; the file
        itself is not changed, should the drain be cancelled."""
        if hop != self.policy.drain:
            return queue_file
        field = arrival_field(queue_file.arrival, queue_file.queue_id)
        return replace(queue_file, message=prepend_fields(queue_file.message, [field]))

    def _outcomes(self, queue_file: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        transport = self.transports[hop.kind]
        try:
            outcomes = transport.deliver(self._traced(queue_file, hop), recipients, hop)
        except Exception as exc:
            log.exception("%s: transport %s failed", queue_file.queue_id, hop)
            return Outcome.same_for(recipients, STATUS_DEFERRED, "4.3.0",
                                    f"internal error in transport {hop}: {exc}", "none")
        if len(outcomes) != len(recipients):
            return Outcome.same_for(recipients, STATUS_DEFERRED, "4.3.0",
                                    f"transport {hop} answered for the wrong number of recipients", "none")
        return outcomes

    def _record(self, queue_file: QueueFile, rcpt: Recipient, outcome: Outcome, report: Report,
                service: str = QMGR, took: float = 0.0) -> None:
        """Record and log a recipient's outcome: one a transport answered, speaking as its
        `service`, in `took` seconds; or the attempt's own (suspended, a loop, split off), as qmgr."""
        rcpt.dsn, rcpt.reply, rcpt.relay = outcome.dsn, outcome.reply, outcome.relay
        if outcome.status == SENT:
            rcpt.state = DELIVERED
            report.sent += 1
        elif outcome.status == BOUNCED:
            rcpt.state = FAILED
            report.bounced += 1
        else:
            report.deferred += 1
        log_delivery(queue_file, rcpt, outcome.status, service,
                     Delays.measure(queue_file.arrival, queue_file.taken, outcome.setup, took - outcome.setup))

    def _expire(self, queue_file: QueueFile, report: Report) -> None:
        days = self.config.max_age
        for rcpt in queue_file.pending():
            rcpt.state = FAILED
            rcpt.dsn = "4.4.7"
            rcpt.reply = f"message expired after {days:g} days in the queue; last error: {rcpt.reply}"
            report.deferred -= 1
            report.bounced += 1
            log_delivery(queue_file, rcpt, "expired", QMGR, Delays.measure(queue_file.arrival, queue_file.taken))

    def _file_away(self, queue_file: QueueFile, report: Report, retry: Retry) -> Report:
        if queue_file.pending():
            now = time.time()
            times = list(retry.times)
            if retry.backoff or not times:
                times.append(now + self.config.backoff(queue_file.attempts))
            due = min(times)
            return self._defer(queue_file, report, due, now if retry.untouched else due)
        queue_id = queue_file.queue_id
        try:
            if report.bounced and self.config.archive_failed:
                report.result = ARCHIVED
                self._store(queue_file, report)
                self.spool.move(queue_id, ACTIVE, ARCHIVE)
                log.info("%s: archived", queue_id)
            else:
                self.spool.remove(ACTIVE, queue_id)
                log.info("%s: removed", queue_id)
        except OSError as exc:
            return self._keep(report, ACTIVE, encode_states(queue_file), exc)
        return report

    def _defer(self, queue_file: QueueFile, report: Report, due: float, mtime: float | None = None) -> Report:
        """Store the states and move the message to deferred/, to be tried at `due`; its file
        says `mtime` (sooner, while entries of its activation wait for room: a restart then
        tries it at once). If the disk cannot take that, keep it in active/ (see _keep)."""
        now = time.time()
        report.result, report.next_attempt = QUEUED_AGAIN, due
        queue_file.add_log(now, f"{SUMMARY} {queue_file.attempts}: {report.sent} sent, "
                                f"{report.deferred} deferred, {report.bounced} bounced")
        try:
            self._store(queue_file, report)
            self.spool.move(queue_file.queue_id, ACTIVE, DEFERRED, mtime=due if mtime is None else mtime)
        except OSError as exc:
            return self._keep(report, ACTIVE, encode_states(queue_file), exc)
        log.info("%s: deferred, next attempt in %.1fs", queue_file.queue_id, due - now)
        return report

    def _keep(self, report: Report, queue: str, states: str, exc: OSError) -> Report:
        """The disk cannot take the message's new state (full, over quota, failing): leave the
        file where it is and tell the supervisor the results it does not record, so that it is
        tried again soon and nothing done is done twice. A full disk is never a worker's death."""
        report.result, report.queue, report.states = KEPT, queue, states
        report.error = error_name(exc)
        report.next_attempt = time.time() + min(self.config.min_backoff, KEPT_RETRY_SECONDS)
        return report

    def _store(self, queue_file: QueueFile, report: Report) -> None:
        """Rewrite the active file with the current states. If the disk is full, fall back to
        the journal (a few bytes, often room in the file's last block), and failing that raise
        OSError. A failure is named in the report, for the supervisor's "spool full" line."""
        try:
            self.spool.write(queue_file, ACTIVE)
            return
        except OSError as exc:
            report.error = error_name(exc)
        self.spool.journal(queue_file.queue_id, enumerate(queue_file.recipients))


def log_delivery(queue_file: QueueFile, rcpt: Recipient, status: str, service: str, delays: Delays) -> None:
    """The one line per recipient and attempt that mail administrators grep for."""
    delivery(service, queue_file.queue_id, rcpt.address, relay=rcpt.relay, delays=delays, dsn=rcpt.dsn,
             status=status, reply=rcpt.reply, attempts=queue_file.attempts)


def first_take(queue_file: QueueFile) -> bool:
    """Whether no attempt has had the message yet: no attempt's summary (which _defer writes
    whenever one files it away for later) is in its history. One kept by a full disk, or left in
    active/ by a crash, before it was stored, is taken in again."""
    return not any(entry.partition(" ")[2].startswith(SUMMARY) for entry in queue_file.log)
