"""One delivery attempt of one message: claim, route, deliver, record, and file it away.

This is the whole life of a message inside a worker. Each recipient is routed afresh, recipients
sharing a next hop go out together, and after each next hop the results are journalled (fsynced)
before the next one is tried, so a crash never delivers twice to a recipient already done.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from policy.next_hop import NextHop
from policy.routing import Policy
from router.config import Config
from router.queue_file import DELIVERED, FAILED, PENDING, CorruptQueueFile, QueueFile, Recipient, parse
from router.spool import ACTIVE, ARCHIVE, CORRUPT, DEFERRED, Spool
from workers.transport import BOUNCED, SENT, Outcome, Transport
from workers.transport import DEFERRED as STATUS_DEFERRED

log = logging.getLogger("qrouter")

REMOVED, QUEUED_AGAIN, ARCHIVED, SKIPPED, CORRUPTED = "removed", "deferred", "archived", "skipped", "corrupt"


@dataclass
class Report:
    """What a worker tells the supervisor about one message, as one line over its pipe."""

    queue_id: str
    result: str
    sent: int = 0
    deferred: int = 0
    bounced: int = 0
    next_attempt: float = 0.0

    def to_line(self) -> bytes:
        return (f"{self.queue_id} {self.result} {self.sent} {self.deferred} {self.bounced} "
                f"{self.next_attempt:.6f}\n").encode()

    @classmethod
    def from_line(cls, line: str) -> Report:
        queue_id, result, sent, deferred, bounced, next_attempt = line.split()
        return cls(queue_id, result, int(sent), int(deferred), int(bounced), float(next_attempt))


def read_whole(path: str) -> bytes:
    """A file's content in one read(2): half the system calls and time of open().read(), which
    also asks isatty() and seeks (this runs once per message)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)  # a regular file reads short only at its end
        while len(data) > size and (more := os.read(fd, 1 << 16)):  # it grew since the fstat
            data += more
        return data
    finally:
        os.close(fd)


class Delivery:
    def __init__(self, spool: Spool, config: Config, policy: Policy, transports: dict[str, Transport]):
        self.spool = spool
        self.config = config
        self.policy = policy
        self.transports = transports

    def attempt(self, queue: str, queue_id: str) -> Report:
        path = self.spool.claim(queue, queue_id)
        if path is None:
            return Report(queue_id, SKIPPED)
        try:
            queue_file = parse(read_whole(path), path)
            if queue_file.queue_id != queue_id:
                raise CorruptQueueFile(f"{path}: its id line says {queue_file.queue_id}, not its file name")
        except CorruptQueueFile as exc:
            log.error("%s: corrupt queue file moved to %s: %s", queue_id, self.spool.path(CORRUPT), exc)
            self.spool.move(queue_id, ACTIVE, CORRUPT)
            return Report(queue_id, CORRUPTED)
        if queue_file.journal_bytes:
            self._store(queue_file)
        if queue_file.attempts == 0 and not queue_file.rewritten and self.policy.rewriter.rules:
            refused = self._rewrite(queue_file)
            if refused is not None:
                return refused
        queue_file.attempts += 1
        report = Report(queue_id, REMOVED)
        self._deliver(queue_file, report)
        if queue_file.pending() and time.time() - queue_file.arrival >= self.config.max_age * 86400:
            self._expire(queue_file, report)
        return self._file_away(queue_file, report)

    def _rewrite(self, queue_file: QueueFile) -> Report | None:
        """Rewrite addresses once, before the first delivery, and make that durable first; if
        it cannot be stored, deliver nothing now (a deferral report) rather than risk rewriting
        twice."""
        changes = self.policy.rewrite(queue_file)
        queue_file.rewritten = True
        try:
            self.spool.write(queue_file, ACTIVE)
        except OSError as exc:
            due = time.time() + self.config.min_backoff
            log.error("%s: cannot store rewritten addresses, trying again later: %s", queue_file.queue_id, exc)
            self.spool.move(queue_file.queue_id, ACTIVE, DEFERRED, mtime=due)
            return Report(queue_file.queue_id, QUEUED_AGAIN, next_attempt=due)
        for change in changes:
            log.info("%s: %s", queue_file.queue_id, change)
        return None

    def _deliver(self, queue_file: QueueFile, report: Report) -> None:
        """Deliver to every pending recipient, next hop by next hop, journalling between them.

        If the journal cannot be written the attempt stops there: the next hops not tried yet
        keep their recipients pending rather than risk an unrecorded delivery.
        """
        groups: dict[NextHop, list[int]] = {}
        for index, rcpt in enumerate(queue_file.recipients):
            if rcpt.state == PENDING:
                groups.setdefault(self.policy.route(rcpt.address).next_hop, []).append(index)
        for position, (hop, indexes) in enumerate(groups.items(), 1):
            recipients = [queue_file.recipients[i] for i in indexes]
            outcomes = self._outcomes(queue_file, recipients, hop)
            for rcpt, outcome in zip(recipients, outcomes, strict=True):
                self._record(queue_file, rcpt, outcome, report)
            if position < len(groups):
                try:
                    self.spool.journal(queue_file.queue_id, [(i, queue_file.recipients[i]) for i in indexes])
                except OSError as exc:
                    log.error("%s: cannot journal results, stopping this attempt: %s", queue_file.queue_id, exc)
                    return

    def _outcomes(self, queue_file: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        transport = self.transports[hop.kind]
        try:
            outcomes = transport.deliver(queue_file, recipients, hop)
        except Exception as exc:
            log.exception("%s: transport %s failed", queue_file.queue_id, hop)
            return Outcome.same_for(recipients, STATUS_DEFERRED, "4.3.0",
                                    f"internal error in transport {hop}: {exc}", "none")
        if len(outcomes) != len(recipients):
            return Outcome.same_for(recipients, STATUS_DEFERRED, "4.3.0",
                                    f"transport {hop} answered for the wrong number of recipients", "none")
        return outcomes

    def _record(self, queue_file: QueueFile, rcpt: Recipient, outcome: Outcome, report: Report) -> None:
        rcpt.dsn, rcpt.reply, rcpt.relay = outcome.dsn, outcome.reply, outcome.relay
        if outcome.status == SENT:
            rcpt.state = DELIVERED
            report.sent += 1
        elif outcome.status == BOUNCED:
            rcpt.state = FAILED
            report.bounced += 1
        else:
            report.deferred += 1
        log_delivery(queue_file, rcpt, outcome.status)

    def _expire(self, queue_file: QueueFile, report: Report) -> None:
        days = self.config.max_age
        for rcpt in queue_file.pending():
            rcpt.state = FAILED
            rcpt.dsn = "4.4.7"
            rcpt.reply = f"message expired after {days:g} days in the queue; last error: {rcpt.reply}"
            report.deferred -= 1
            report.bounced += 1
            log_delivery(queue_file, rcpt, "expired")

    def _file_away(self, queue_file: QueueFile, report: Report) -> Report:
        queue_id = queue_file.queue_id
        now = time.time()
        if queue_file.pending():
            report.result = QUEUED_AGAIN
            report.next_attempt = now + self.config.backoff(queue_file.attempts)
            queue_file.add_log(now, f"attempt {queue_file.attempts}: {report.sent} sent, "
                                    f"{report.deferred} deferred, {report.bounced} bounced")
            self._store(queue_file)
            self.spool.move(queue_id, ACTIVE, DEFERRED, mtime=report.next_attempt)
            log.info("%s: deferred, next attempt in %.1fs", queue_id, report.next_attempt - now)
        elif report.bounced and self.config.archive_failed:
            report.result = ARCHIVED
            self._store(queue_file)
            self.spool.move(queue_id, ACTIVE, ARCHIVE)
            log.info("%s: archived", queue_id)
        else:
            self.spool.remove(ACTIVE, queue_id)
            log.info("%s: removed", queue_id)
        return report

    def _store(self, queue_file: QueueFile) -> None:
        """Rewrite the active file with the current states. If the disk is full, fall back to
        the journal (a few bytes), and failing that keep the file as it is: at worst a recipient
        done in this attempt is tried again."""
        try:
            self.spool.write(queue_file, ACTIVE)
            return
        except OSError as exc:
            log.error("%s: cannot rewrite queue file: %s", queue_file.queue_id, exc)
        try:
            self.spool.journal(queue_file.queue_id, enumerate(queue_file.recipients))
        except OSError as exc:
            log.error("%s: cannot journal results either, recipients done now may be tried again: %s",
                      queue_file.queue_id, exc)


def log_delivery(queue_file: QueueFile, rcpt: Recipient, status: str) -> None:
    """The one line per recipient and attempt that mail administrators grep for."""
    log.info("%s: to=<%s>, relay=%s, delay=%.2f, attempts=%d, dsn=%s, status=%s (%s)",
             queue_file.queue_id, rcpt.address, rcpt.relay or "none", time.time() - queue_file.arrival,
             queue_file.attempts, rcpt.dsn, status, rcpt.reply)
