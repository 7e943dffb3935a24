"""After each delivery attempt: which reports the sender gets, queued as messages of their own.

With `send-ndr`, one report per message and attempt tells the sender of the recipients that
failed in it (expired ones included) and of those delivered whose NOTIFY asked for SUCCESS where
the next hop did not take the request on; with `delay-warning`, one warning, once, tells of
those still waiting. A recipient's NOTIFY decides whether it is in a report at all
(workers/report.py `wants`).

A report is queued in incoming/ like any message (durable), routed, rewritten and retried, with
the envelope sender <>, before the recipients are marked `reported` and the original is filed
away: a crash in between gives a second report at worst, never none. Mail from <> is never
reported on; its failures go, when `bounce-notice-recipient` is set, to that address instead, in
a report nothing is ever reported about (NOTIFY=NEVER), so no loop can start.
"""

from __future__ import annotations

import time

from router.config import Config
from router.logs.lines import BOUNCE, logger
from router.spool import INCOMING, Spool
from router.spool.queue_file import QueueFile, Recipient
from router.spool.queue_id import arrival_of, new_queue_id
from workers.report import DELAY, DELAYED, FAILED, FAILURE, Notice, build, wants

log = logger(BOUNCE)

_WHAT = {FAILED: "non-delivery", DELAYED: "delay"}


class Notifier:
    def __init__(self, spool: Spool, config: Config) -> None:
        self.spool = spool
        self.config = config
        self._me = ""

    @property
    def me(self) -> str:
        """Our host name, looked up once (it may ask DNS), when the first report is made."""
        if not self._me:
            self._me = self.config.hostname
        return self._me

    def after_attempt(self, queue_file: QueueFile, successes: list[Notice]) -> bool:
        """Queue what the attempt calls for; False when a report could not be queued (the disk):
        the message must then stay, so that the report is made at its next attempt."""
        if not self.config.send_ndr:
            return True
        to = queue_file.sender or self.config.bounce_notice_recipient
        failures = [Notice(r, FAILED) for r in queue_file.recipients
                    if r.state == FAILED and not r.reported and wants(r, FAILURE)]
        notices = failures + successes
        if notices and not to:
            log.info("%s: no report for %d recipient(s): the sender is <>", queue_file.queue_id, len(failures))
            for notice in notices:
                notice.recipient.reported = True
        elif notices and not self._queue(queue_file, notices, to):
            return False
        return self._warn(queue_file, to)

    def _warn(self, queue_file: QueueFile, to: str) -> bool:
        """The delay warning, once: `warned` is stored with the message's new state."""
        hours = self.config.delay_warning
        now = time.time()
        if not hours or queue_file.warned or not queue_file.pending() or now - queue_file.arrival < hours * 3600:
            return True
        delayed = [Notice(r, DELAYED) for r in queue_file.pending() if wants(r, DELAY)]
        if delayed and to and queue_file.sender:
            retry_until = queue_file.arrival + self.config.max_age * 86400
            if not self._queue(queue_file, delayed, to, retry_until):
                return False
        queue_file.warned = now
        return True

    def _queue(self, queue_file: QueueFile, notices: list[Notice], to: str, retry_until: float = 0.0) -> bool:
        report_id = new_queue_id()
        data = build(queue_id=queue_file.queue_id, arrival=queue_file.arrival, sender=queue_file.sender,
                     envid=queue_file.envid, ret=queue_file.ret, message=queue_file.message, notices=notices,
                     me=self.me, to=to, now=time.time(), size_limit=self.config.bounce_size_limit,
                     retry_until=retry_until)
        double = not queue_file.sender  # about mail from <>: to bounce-notice-recipient, never reported on
        report = QueueFile(report_id, arrival_of(report_id), "", [Recipient(to, notify="NEVER" if double else "")],
                           data)
        report.add_log(report.arrival, f"report on {queue_file.queue_id}")  # its history says it is qrouter's own
        try:
            self.spool.write(report, INCOMING)
        except OSError as exc:
            log.error("%s: cannot queue the report to <%s> (%s); it is made again at the next attempt",
                      queue_file.queue_id, to, exc.strerror or exc)
            return False
        main = notices[0].action
        what = "undeliverable mail" if double else f"sender {_WHAT.get(main, 'delivery status')}"
        log.info("%s: %s notification: %s", queue_file.queue_id, what, report_id)
        for notice in notices:
            if notice.action != DELAYED:
                notice.recipient.reported = True
        return True
