"""The commands that change the queue: one method per command, as gunicorn's control handlers.

    flush    retry now            (deferred/)
    hold     keep from delivery   (incoming/, deferred/ -> hold/)
    release  deliver again        (hold/ -> incoming/)
    delete   remove for good      (any queue but active/)
    requeue  route and rewrite afresh, like postsuper -r (deferred/, hold/ -> incoming/)

The same table serves the daemon, which runs it on its own files when `qrouter queue ...` asks
through the status socket (it stays the one authority: a message a worker holds is held or
deleted after its attempt, never under the worker), and the command itself when no daemon runs.
What the daemon must know (its retry schedule, the messages in hand) comes through `Daemon`;
without a daemon that is `Daemon()`, which knows nothing and is told nothing.

Every id is checked to be a queue id before any path is made of it: nothing outside the spool
is ever touched.
"""

from __future__ import annotations

import os
import time

from router.spool import ACTIVE, ARCHIVE, CORRUPT, DEFERRED, HOLD, INCOMING, NotAQueueFile, Spool, read_queue_file
from router.spool.queue_file import MAX_OVERHEAD, parse
from router.spool.queue_id import is_queue_id

COMMANDS = ("flush", "hold", "release", "delete", "requeue")
SEARCHED = (INCOMING, ACTIVE, DEFERRED, HOLD, ARCHIVE, CORRUPT)


class ControlError(Exception):
    """Why a command could not act on a message."""


class Daemon:
    """What the queue commands tell a running daemon; this one is for when none runs."""

    def in_hand(self, queue_id: str) -> bool:
        return False

    def after_attempt(self, queue_id: str, command: str) -> None:
        raise ControlError("in active/: a delivery attempt is in progress or was cut short; start the daemon")

    def scheduled(self, queue_id: str, due: float) -> None:
        pass

    def unscheduled(self, queue_id: str) -> None:
        pass


class QueueCommands:
    def __init__(self, spool: Spool, daemon: Daemon | None = None) -> None:
        self.spool = spool
        self.daemon = daemon or Daemon()

    def run(self, command: str, ids: list[str]) -> dict[str, dict[str, str]]:
        """Run `command` on each id: {"done": {id: what was done}, "failed": {id: why not}}."""
        if command not in COMMANDS:
            raise ControlError(f"unknown command {command!r} (known: {', '.join(COMMANDS)})")
        answer: dict[str, dict[str, str]] = {"done": {}, "failed": {}}
        for queue_id in ids:
            try:
                if not isinstance(queue_id, str) or not is_queue_id(queue_id):
                    raise ControlError("not a queue id")
                answer["done"][queue_id] = getattr(self, command)(queue_id, self.locate(queue_id))
            except (ControlError, ValueError, NotAQueueFile) as exc:  # ValueError: a corrupt file
                answer["failed"][str(queue_id)[:80]] = str(exc)
            except OSError as exc:
                answer["failed"][queue_id] = exc.strerror or str(exc)
        return answer

    def locate(self, queue_id: str) -> str:
        for queue in SEARCHED:
            if os.path.lexists(self.spool.path(queue, queue_id)):
                return queue
        raise ControlError("no such message")

    # -- one method per command: (queue id, the queue it is in) -> what was done ------------

    def flush(self, queue_id: str, queue: str) -> str:
        if queue != DEFERRED:
            raise ControlError(f"in {queue}/, not deferred/: nothing to flush")
        now = time.time()
        os.utime(self.spool.path(DEFERRED, queue_id), (now, now))
        self.daemon.scheduled(queue_id, now)
        return "will be tried now"

    def hold(self, queue_id: str, queue: str) -> str:
        if queue == ACTIVE or self.daemon.in_hand(queue_id):
            self.daemon.after_attempt(queue_id, "hold")
            return "being delivered: held after this attempt, if anything is left"
        if queue not in (INCOMING, DEFERRED):
            raise ControlError(f"in {queue}/: only mail waiting for delivery can be held")
        self._move(queue_id, queue, HOLD)
        return "held"

    def release(self, queue_id: str, queue: str) -> str:
        if queue != HOLD:
            raise ControlError(f"in {queue}/, not hold/")
        self._move(queue_id, HOLD, INCOMING)
        return "released"

    def delete(self, queue_id: str, queue: str) -> str:
        if queue == ACTIVE or self.daemon.in_hand(queue_id):
            self.daemon.after_attempt(queue_id, "delete")
            return "being delivered: deleted after this attempt, if anything is left"
        self.daemon.unscheduled(queue_id)
        os.unlink(self.spool.path(queue, queue_id))
        return "deleted"

    def requeue(self, queue_id: str, queue: str) -> str:
        if queue not in (DEFERRED, HOLD):
            raise ControlError(f"in {queue}/: only deferred or held mail can be requeued")
        path = self.spool.path(queue, queue_id)
        queue_file = parse(read_queue_file(path, self.spool.size_limit + MAX_OVERHEAD), path)
        queue_file.rewritten = False  # the rewriting rules in force apply again, before the next attempt
        # Rewritten where it is, then moved: each step is one rename, and the copy is staged as
        # the daemon's own rewrites are (tmp/ID.QUEUE), which the daemon removes when it starts.
        # A command killed on the way leaves the message in `queue` or in incoming/, never in both,
        # and no copy in tmp/ that a start would take for a front door's file still being written.
        self.daemon.unscheduled(queue_id)
        self.spool.write(queue_file, queue)
        self._move(queue_id, queue, INCOMING)
        return "requeued: rewritten and routed afresh"

    def _move(self, queue_id: str, source: str, target: str) -> None:
        self.daemon.unscheduled(queue_id)
        if not self.spool.move(queue_id, source, target):
            raise ControlError(f"gone from {source}/ meanwhile")
