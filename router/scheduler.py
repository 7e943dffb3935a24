"""Destinations as the scheduler sees them: how many deliveries each may have in progress, and
which are dead. Postfix's queue manager is the model (SCHEDULER_README):

- A destination is what the policy routes a recipient to (NextHop.destination): a relay host
  list, an MX domain, an LMTP socket, a Maildir template.
- Its concurrency window starts at INITIAL_WINDOW and grows with every delivery that reached it,
  up to `destination-concurrency`: by 1 each until the destination first fails (a slow start, as
  TCP's: a destination that takes everything gets its full window within a few rounds), by
  1/window each after that (one more session per window's worth of successes). It shrinks by
  1/window for every attempt that could not reach it (connection refused, timed out, lost),
  never below 1.
- When every attempt of a whole round fails (as many in a row as the window is wide), the
  destination is dead: its mail is deferred without new connections until the probe time; then
  one message goes as the probe. If it reaches the destination, the window opens again from 1
  and the mail deferred for it is retried soon, spread out; if not, it stays dead.

Nothing here does I/O or knows processes: the supervisor asks, acts and tells.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from urllib.parse import unquote

INITIAL_WINDOW = 5
PROBE_SECONDS = 60.0  # a dead destination is probed after min-backoff, or after this if sooner
RECOVERY_SPREAD = 0.05  # seconds between retries of the mail deferred for a destination come back
MAX_RECOVERY_SPREAD = 30.0  # however much was waiting, all of it is retried within this


@dataclass
class Destination:
    name: str
    window: float
    in_flight: int = 0
    failures: int = 0  # attempts in a row that could not reach it
    dead_until: float = 0.0  # dead while > 0; the probe may go at this time
    probing: bool = False
    failed_once: bool = False  # ends the slow start
    last_error: str = ""
    waiting: deque[tuple[str, str]] = field(default_factory=deque)  # (queue, id) held back: window full
    deferred: set[str] = field(default_factory=set)  # deferred because it could not be reached

    @property
    def label(self) -> str:
        """The name as an administrator wrote it (NextHop.destination quotes white space and commas)."""
        return unquote(self.name)

    @property
    def dead(self) -> bool:
        return self.dead_until > 0

    def status(self) -> dict[str, object]:
        return {"destination": self.label, "sessions": self.in_flight, "window": round(self.window, 2),
                "dead": self.dead, "waiting": len(self.waiting), "deferred": len(self.deferred),
                "last_error": self.last_error or None}


class Scheduler:
    def __init__(self, limit: int, probe_seconds: float):
        self.limit = limit
        self.probe_seconds = probe_seconds
        self.destinations: dict[str, Destination] = {}

    def get(self, name: str) -> Destination:
        found = self.destinations.get(name)
        if found is None:
            found = self.destinations[name] = Destination(name, float(min(INITIAL_WINDOW, self.limit)))
        return found

    def blocker(self, names: list[str], now: float) -> Destination | None:
        """The first destination that keeps a message with these destinations from going now
        (dead, or its window full), or None: then `start` it."""
        for name in names:
            destination = self.get(name)
            if destination.dead and now >= destination.dead_until and not destination.probing:
                continue  # this message will be its probe
            if destination.dead or destination.in_flight >= int(destination.window):
                return destination
        return None

    def start(self, names: list[str], now: float) -> None:
        for name in names:
            destination = self.get(name)
            destination.in_flight += 1
            if destination.dead and now >= destination.dead_until:
                destination.probing = True

    def finish(self, names: list[str], reach: dict[str, str], now: float) -> tuple[list[Destination],
                                                                                    list[Destination]]:
        """A message with these destinations is done; `reach` says for the ones it tried whether
        they were reached ("") or not (why). Returns the destinations that came back to life and
        those that were just found dead."""
        revived, died = [], []
        for name in names:
            destination = self.get(name)
            destination.in_flight = max(0, destination.in_flight - 1)
            if name not in reach:
                destination.probing = False  # a probe that did not get there: the next message is one
                continue
            if not reach[name]:
                if self._reached(destination):
                    revived.append(destination)
            elif self._unreachable(destination, reach[name], now):
                died.append(destination)
        return revived, died

    def _reached(self, destination: Destination) -> bool:
        destination.failures = 0
        if destination.dead:
            destination.dead_until, destination.probing, destination.window = 0.0, False, 1.0
            return True
        growth = 1 / destination.window if destination.failed_once else 1.0
        destination.window = min(float(self.limit), destination.window + growth)
        return False

    def _unreachable(self, destination: Destination, why: str, now: float) -> bool:
        """Learn that an attempt could not reach it; True if that makes it dead now."""
        destination.last_error = why
        destination.failures += 1
        destination.failed_once = True
        destination.window = max(1.0, destination.window - 1 / destination.window)
        was_dead = destination.dead
        if destination.probing or destination.failures >= int(destination.window):
            destination.dead_until = now + self.probe_seconds
            destination.probing = False
        return destination.dead and not was_dead

    def recovery_times(self, destination: Destination, now: float) -> list[tuple[str, float]]:
        """When to retry each message deferred for a destination that came back: soon, spread
        out so that it is not flooded."""
        ids = sorted(destination.deferred)
        destination.deferred.clear()
        step = min(RECOVERY_SPREAD, MAX_RECOVERY_SPREAD / max(len(ids), 1))
        return [(queue_id, now + step * (i + 1)) for i, queue_id in enumerate(ids)]

    def status(self) -> list[dict[str, object]]:
        """The destinations worth showing: those with anything in progress, waiting or wrong."""
        return [d.status() for d in self.destinations.values()
                if d.in_flight or d.waiting or d.deferred or d.dead or d.failures]
