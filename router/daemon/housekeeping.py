"""The supervisor's periodic work, each item at its own interval, all of it from the main loop
(no thread of its own): letting the dispatcher forget idle destinations, pruning archive/, the
status snapshot the metrics and the cluster's view read, and the day's TLS reports.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from router.config import Config
from router.daemon.dispatcher import Dispatcher
from router.logs.lines import QMGR, logger
from router.spool import ARCHIVE, Spool
from workers.tls_reports import Trigger

if TYPE_CHECKING:
    from router.daemon.cluster_view import Publisher
    from router.daemon.metrics import Metrics

log = logger(QMGR)

TIDY_SECONDS = 60.0  # idle destinations are let go this often
PRUNE_SECONDS = 3600.0  # archive/ is pruned this often (archive-max-age)
MEASURE_SECONDS = 1.0  # the metrics and the cluster's view get a status snapshot this often


class Housekeeping:
    """Call `tick()` on every turn of the main loop; each item runs when its interval is up.
    `status()` makes the supervisor's status; `ask_worker(record)` hands a question to a network
    worker (its pid, 0 when none could take it)."""

    def __init__(self, spool: Spool, dispatcher: Dispatcher, status: Callable[[], dict[str, Any]],
                 ask_worker: Callable[[dict[str, Any]], int], metrics: Metrics | None,
                 publisher: Publisher | None) -> None:
        self.spool = spool
        self.dispatcher = dispatcher
        self.status = status
        self.ask_worker = ask_worker
        self.metrics = metrics
        self.publisher = publisher
        self.tls_reports = Trigger()  # with tls-report: once a day is over, a network worker sends its reports
        self.tidied = time.monotonic()
        self.measured = -MEASURE_SECONDS  # the first snapshot at once
        self.pruned = -PRUNE_SECONDS  # archive/ is pruned at start, then once an hour

    def tick(self, config: Config) -> None:
        self._prune_archive(config.archive_max_age)
        self.tls_reports.tick(config, self.ask_worker)
        self._tidy()
        self._measure()

    def _tidy(self) -> None:
        """Once a minute, the dispatcher lets go of idle destinations and stale sites."""
        if time.monotonic() - self.tidied >= TIDY_SECONDS:
            self.tidied = time.monotonic()
            self.dispatcher.forget_idle(time.time())

    def _measure(self) -> None:
        """Hand the metrics and the cluster's view a snapshot of the status once a second; each
        reads it from its own thread, never the supervisor's state itself."""
        if (self.metrics or self.publisher) and time.monotonic() - self.measured >= MEASURE_SECONDS:
            self.measured = time.monotonic()
            status = self.status()
            if self.metrics:
                self.metrics.snapshot(status)
            if self.publisher:
                self.publisher.offer(status)

    def _prune_archive(self, days: float) -> None:
        """With archive-max-age, remove what has been in archive/ longer, once an hour."""
        if not days or time.monotonic() - self.pruned < PRUNE_SECONDS:
            return
        self.pruned = time.monotonic()
        oldest = time.time() - days * 86400
        removed = 0
        for entry in os.scandir(self.spool.path(ARCHIVE)):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < oldest:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue  # gone meanwhile, or the disk refuses: next hour
        if removed:
            log.info("removed %d message(s) archived more than %g days ago (archive-max-age)", removed, days)
