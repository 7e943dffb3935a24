"""The dispatcher: every decision about destinations, and which message goes where when.

Postfix's queue manager is the model (SCHEDULER_README). The unit it schedules is an entry: one
message's pending recipients for one destination. A message routed to three destinations has three
entries, and each waits, goes or is suspended on its own destination's state:

- A destination is what the policy routes a recipient to (NextHop.destination): a relay host
  list, an MX domain, an LMTP socket, a Maildir template.
- Its concurrency window starts at its initial window and grows while the destination is busy up
  to it (deliveries in flight fill the window, or entries wait for it), up to its concurrency
  limit: by 1 per delivery that reached it until the first failure (a slow start), by 1/window
  after that. It shrinks by 1/window for every attempt that could not reach it, never below 1.
- A whole round of failures at the current window (as many in a row as it is wide) makes it
  dead: its entries are suspended (deferred without an attempt) until the probe time; then one
  entry goes as the probe. If that reaches it, the window opens again from 1 and the messages
  suspended for it are retried soon, spread out.
- Connections to a destination, in use and kept idle in any worker, never exceed its limit:
  workers report the idle connections they keep, an entry goes preferably to a worker that keeps
  one, and when none with room does and the limit is taken, a worker is told to drop an idle one.
  Tasks to a worker are numbered. A worker counts its idle connections less those promised to
  tasks it has read and not begun, and says which task it read last; the promises in tasks it
  has not read yet are subtracted here. So an idle connection is never promised twice, and one
  promised in a task not read yet is counted both as idle and as in flight (never as neither).
- A rate (messages per second, from the destinations file) spaces the entries' starts.
- In a cluster (`shared`, router/daemon/cluster.py) the connection limit is this node's leases, a
  rate's starts also take tokens of the cluster's bucket, and a dead destination's probe is made
  by the one node that claimed it; the others' mail waits for its outcome.
- MX rollup: the domains whose MX hosts are the same (a site, `site:mx1.example,mx2.example`)
  are one destination, as KumoMTA rolls them up, unless a domain's rule says `mx-rollup=no`. A
  worker looks the site up (the dispatcher asks through the supervisor); an entry for an MX
  domain whose site is not known yet waits for the answer, so even the first messages to two
  hundred domains of one provider count against that provider's one limit. What a site is, is
  remembered for SITE_SECONDS.

An entry is named as the worker names next hops (NextHop.destination: `mx:example.com`); the
destination it counts against is the same name, or its site.

A message's entries that can go now go together to one worker, with the entries suspended for a
dead destination (recorded there without an attempt, so expiry, delay warnings and reports apply
to them as to any deferred recipient) and those still waiting for room (left untouched). The
waiting ones go when their destination or their kind of worker has room; a message whose entries
are all suspended is deferred without a worker until the first probe, unless it expires or is
due a delay warning before that. The entries of one message taken up together make an
activation; when every entry of it has gone (or was suspended), the message is scheduled again
for the earliest retry any of them asked for.

When the policy changes (a reload, a drain begun or cancelled: the workers are forked again with
it), the messages held here are routed again (`rerouted`, a budget's worth a turn), so that each
entry waits for, and is counted against, the destination the new workers deliver it to: left in
the old destinations' lines, they would go out counted against those while connecting to the new
one, past its limit. A message in flight is routed again when its worker has filed it; the
entries that went in its activation do not go again.

Nothing here does I/O or knows processes: `route` (given by the supervisor) reads a message's
envelope, and the supervisor hands over the workers' free sessions, writes the tasks this
returns, and tells what the workers report.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote

from router.daemon.schedule import Schedule

PROBE_SECONDS = 60.0  # a dead destination is probed after min-backoff, or after this if sooner
RECOVERY_SPREAD = 0.05  # seconds between retries of the mail deferred for a destination come back
MAX_RECOVERY_SPREAD = 30.0  # however much was waiting, all of it is retried within this
SUSPEND_SPREAD = 1.0  # suspended messages come due over this long after the probe time, not at once
READY_BUDGET = 2000  # ready messages routed in one turn of the supervisor's loop
SITE_SECONDS = 3600.0  # how long a domain's site is believed
NO_SITE_SECONDS = 60.0  # a domain whose MX hosts could not be found is its own destination this long
ASK_AGAIN_SECONDS = 30.0  # a site lookup not answered by then (its worker died) is asked again
MX_PREFIX = "mx:"  # the entries MX rollup applies to (NextHop.destination of MX routing)
REUSE, NEW = "reuse", "new"  # how an entry gets its connection (Dispatcher._connect)
NEVER = float("inf")


@dataclass(frozen=True)
class Limits:
    """A destination's settings: the defaults from the config, or its rule in the destinations file."""

    concurrency: int
    initial_window: int
    rate: float | None = None  # messages per second
    mx_rollup: bool = True  # for an MX domain: counted against its site


class Shared(Protocol):
    """Limits shared with other nodes (a cluster: router/daemon/cluster.py). It answers at once,
    from what it last heard, and never does I/O here."""

    def concurrency(self, destination: Destination) -> int:
        """Connections this node may have to the destination now."""

    def may_start(self, destination: Destination, now: float) -> bool:
        """Whether the destination's rate lets this node start an entry now."""

    def started(self, destination: Destination) -> None:
        """An entry started (it spent what may_start allowed)."""

    def probe_wait(self, destination: Destination, now: float) -> float | None:
        """None if this node is to probe the dead destination now, else until when to wait."""

    def shedding(self, destination: Destination) -> bool:
        """This node has more connections open there than it may now have (above its fair share,
        or its part while Redis is away): idle ones are closed, not used again."""


@dataclass(frozen=True)
class Routed:
    """What the supervisor learnt from a message's envelope: the destinations of its pending
    recipients (those its kind of worker delivers; a mixed message's others are split off by the
    worker), the kind of worker it needs, and when a worker must see it even if every destination
    is dead (it expires, or its delay warning is due)."""

    destinations: tuple[str, ...]
    pool: str
    visit_at: float = NEVER


@dataclass
class Destination:
    name: str
    limits: Limits
    window: float
    in_flight: int = 0
    kept: Counter[int] = field(default_factory=Counter)  # worker pid -> idle connections it last reported
    promised: dict[int, deque[int]] = field(default_factory=dict)  # worker pid -> numbers of the tasks sent
    # to reuse one of its idle connections, that it had not read when it last counted them
    failures: int = 0  # attempts in a row that could not reach it
    dead_until: float = 0.0  # dead while > 0; the probe may go at this time
    probing: bool = False
    failed_once: bool = False  # ends the slow start
    last_error: str = ""
    next_start: float = 0.0  # with a rate: no entry starts before this
    waiting: deque[str] = field(default_factory=deque)  # queue ids with an entry waiting for room, in order
    lined: set[str] = field(default_factory=set)  # the same ids, to ask whether one is there
    deferred: set[str] = field(default_factory=set)  # queue ids with recipients deferred because it is unreachable
    domains: set[str] = field(default_factory=set)  # a site's: the entries (MX domains) it holds

    @property
    def label(self) -> str:
        """The name as an administrator wrote it (NextHop.destination quotes white space and commas)."""
        return unquote(self.name)

    @property
    def dead(self) -> bool:
        return self.dead_until > 0

    def idle(self, pid: int) -> int:
        """Idle connections of worker `pid` that no entry has been promised."""
        return max(0, self.kept[pid] - len(self.promised.get(pid, ())))

    @property
    def connections(self) -> int:
        """Connections open or about to be: deliveries in flight and idle ones kept by workers."""
        return self.in_flight + sum(self.kept.values())

    @property
    def open(self) -> int:
        """The same without counting twice an idle connection promised to a task its worker has
        not read yet (in flight already): what the server sees."""
        return self.in_flight + sum(self.idle(pid) for pid in self.kept)

    def status(self) -> dict[str, Any]:
        return {"destination": self.label, "sessions": self.in_flight, "window": round(self.window, 2),
                "limit": self.limits.concurrency, "kept": sum(self.kept.values()), "dead": self.dead,
                "waiting": len(self.lined), "deferred": len(self.deferred), "last_error": self.last_error or None,
                "domains": len(self.domains)}


@dataclass
class Job:
    """A message the dispatcher holds: its activation's entries not gone yet, and its place."""

    queue: str
    queue_id: str
    pool: str
    todo: dict[str, None]  # destinations whose entry has not gone in this activation, in routing order
    visit_at: float
    due: float = NEVER  # the earliest retry the entries gone in this activation asked for
    worker: int = 0  # the pid it is in flight with; 0 when it is not
    attempted: bool = False  # a task of this activation had entries to attempt
    going: tuple[tuple[str, str], ...] = ()  # (entry, destination) of the entries in flight
    done: set[str] = field(default_factory=set)  # entries gone or suspended in this activation
    stale: bool = False  # routed by a policy no longer in force: routed again once its worker filed it,
    # or in its turn (Dispatcher.stale) if it is not in flight


@dataclass
class Task:
    """What one worker is told to do with one message (see workers/delivery.py Plan)."""

    queue: str
    queue_id: str
    go: list[str] | None  # destinations to attempt now; None: every pending recipient
    suspended: dict[str, tuple[str, float]] = field(default_factory=dict)  # destination -> (why, retry at)
    later: list[str] = field(default_factory=list)  # destinations whose entries still wait: left untouched
    due: float = 0.0  # the retry asked for by the entries that went earlier in this activation
    number: int = 0  # its place among the tasks made for its worker (0: made outside the dispatcher)
    reuse: list[str] = field(default_factory=list)  # destinations where it was promised an idle connection
    continued: bool = False  # an earlier task of the same activation attempted some: not another attempt

    def record(self) -> dict[str, Any]:
        task: dict[str, Any] = {"queue": self.queue, "id": self.queue_id}
        if self.number:
            task["number"] = self.number
        if self.reuse:
            task["reuse"] = self.reuse
        if self.continued:
            task["continued"] = True
        if self.go is not None:
            task["go"] = self.go
        if self.suspended:
            task["suspended"] = {name: list(value) for name, value in self.suspended.items()}
        if self.later:
            task["later"] = self.later
        if self.due:
            task["due"] = self.due
        return task


@dataclass
class Suspension:
    """A message whose entries are all suspended: deferred by the supervisor, no worker needed."""

    queue: str
    queue_id: str
    due: float
    why: dict[str, tuple[str, float]]  # entry -> ("delivery temporarily suspended: ...", probe time)


class Dispatcher:
    def __init__(self, limits: Callable[[str], Limits], probe_seconds: float,
                 route: Callable[[str, str], Routed | None]) -> None:
        self.limits = limits
        self.probe_seconds = probe_seconds
        self.route = route
        self.destinations: dict[str, Destination] = {}
        self.schedule = Schedule()  # deferred messages by next attempt
        self.fresh: deque[tuple[str, str]] = deque()  # (queue, id) never tried, or given back: not routed yet
        self.retries: deque[tuple[str, str]] = deque()  # (queue, id) due again: not routed yet
        self.queued: set[str] = set()  # ids in fresh or retries
        self.jobs: dict[str, Job] = {}  # routed messages: in flight, or with entries waiting
        self.pool_waiting: dict[str, deque[str]] = {}  # pool -> ids that found no worker of their kind with room
        self.lined: set[str] = set()  # destinations with entries waiting
        self.deferred_for: dict[str, set[str]] = {}  # queue id -> destinations whose `deferred` hold it
        self.drops: dict[int, set[str]] = {}  # worker pid -> destinations it is to drop an idle connection to
        self.numbers: dict[int, int] = {}  # worker pid -> the number of the last task made for it
        self.sites: dict[str, tuple[str, float]] = {}  # MX entry -> (its site, or "" for none; until when)
        self.unresolved: dict[str, set[str]] = {}  # MX entry whose site is asked for -> ids waiting for it
        self.asked: dict[str, tuple[int, float]] = {}  # MX entry -> (the worker asked, when)
        self.to_ask: list[str] = []  # MX entries to look up, not asked yet
        self.more_ready = False  # a turn stopped at its budget with mail still ready
        self.stale: deque[str] = deque()  # held here, not in flight, to route again by the policy now in force
        self.shared: Shared | None = None  # with a cluster: the limits all its nodes share
        self.changed: set[str] = set()  # with a cluster: destinations whose connections, line or life changed

    # -- destinations ---------------------------------------------------------------------

    def take_changed(self) -> set[str]:
        """The destinations whose connections, line or life changed since the last call: what a
        cluster looks at again (router/daemon/cluster.py), so that it never walks every destination
        known here, most of which may only hold deferred mail."""
        changed, self.changed = self.changed, set()
        return changed

    def _touch(self, destination: Destination) -> None:
        if self.shared is not None:
            self.changed.add(destination.name)

    def get(self, name: str) -> Destination:
        found = self.destinations.get(name)
        if found is None:
            limits = self.limits(name)
            found = self.destinations[name] = Destination(name, limits, float(limits.initial_window))
        return found

    def reconfigure(self, probe_seconds: float) -> None:
        """After a reload: every known destination takes its settings from the new policy, and
        which MX domains are rolled up into sites is decided again (mx-rollup may have changed)."""
        self.probe_seconds = probe_seconds
        for destination in self.destinations.values():
            destination.limits = self.limits(destination.name)
            destination.window = min(destination.window, float(destination.limits.concurrency))
            destination.domains.clear()
        self.sites.clear()

    def destination_of(self, entry: str, now: float) -> Destination | None:
        """The destination an entry counts against: its own, or for an MX domain its site; None
        while the site is being looked up."""
        if not entry.startswith(MX_PREFIX):
            return self.get(entry)
        site, until = self.sites.get(entry, ("", 0.0))
        if now < until:
            if not site:
                return self.get(entry)
            destination = self.get(site)
            destination.domains.add(entry)
            return destination
        if not self.limits(entry).mx_rollup:
            self.sites[entry] = ("", NEVER)
            return self.get(entry)
        if entry not in self.unresolved:
            self.unresolved[entry] = set()
            self.to_ask.append(entry)
        return None

    def take_lookups(self, now: float) -> list[str]:
        """The MX entries whose site a worker is to look up: new ones, and those asked of a worker
        that has not answered in ASK_AGAIN_SECONDS."""
        late = [entry for entry, (_, when) in self.asked.items() if now - when >= ASK_AGAIN_SECONDS]
        names, self.to_ask = self.to_ask + late, []
        return names

    def asked_of(self, pid: int, entries: list[str], now: float) -> None:
        for entry in entries:
            self.asked[entry] = (pid, now)

    def site_found(self, entry: str, site: str, now: float) -> None:
        """A worker found the site of an MX entry ("" for none: its MX hosts could not be found
        now); the messages waiting for it are placed again."""
        self.sites[entry] = (site, now + (SITE_SECONDS if site else NO_SITE_SECONDS))
        self.asked.pop(entry, None)
        for queue_id in self.unresolved.pop(entry, set()):
            job = self.jobs.get(queue_id)
            if job is not None and not job.worker:
                self.pool_waiting.setdefault(job.pool, deque()).append(queue_id)

    def sites_of(self, entries: Iterable[str]) -> dict[str, str]:
        """The sites MX rollup put these entries in, those known."""
        return {entry: self.sites[entry][0] for entry in entries if self.sites.get(entry, ("", 0.0))[0]}

    def _has_room(self, destination: Destination, now: float) -> bool:
        if destination.in_flight >= int(destination.window):
            return False
        if destination.limits.rate is not None and now < destination.next_start:
            return False
        return self.shared is None or self.shared.may_start(destination, now)

    def _limit(self, destination: Destination) -> int:
        """Connections the destination may have from here: its limit, or this node's part of a
        cluster's."""
        return destination.limits.concurrency if self.shared is None else self.shared.concurrency(destination)

    def _probe_waits(self, destination: Destination, now: float) -> bool:
        """A dead destination whose probe time has come: in a cluster another node may be the one to
        probe it, and then its mail waits as long as that node's probe may take."""
        until = None if self.shared is None else self.shared.probe_wait(destination, now)
        if until is not None:
            destination.dead_until = until
            self._touch(destination)
        return until is not None

    def drop_idle(self, destination: Destination) -> None:
        """Have the workers close their idle connections to the destination (other nodes of a
        cluster wait for room there); not one that has some promised to a task it has not read,
        which would open a new one while the old one is still closing."""
        for pid in destination.kept:
            if destination.idle(pid) and not destination.promised.get(pid):
                self.drops.setdefault(pid, set()).add(destination.name)

    def revived_elsewhere(self, destination: Destination) -> bool:
        """Another node's probe reached a destination dead here: alive again, as after a probe of
        this node. True if it was dead."""
        return self._reached(destination, busy=False)

    def probe_begins(self, name: str) -> bool:
        """Whether a probe of recipient verification (router/daemon/verifier.py) may connect to `name`
        now; if so it takes a place in the destination's window, as a delivery does, until
        `probe_ends`: probes and deliveries together never exceed the destination's limits."""
        destination = self.get(name)
        full = destination.connections >= self._limit(destination)  # idle ones kept count too
        if full or destination.in_flight >= int(destination.window):
            return False
        destination.in_flight += 1
        self._touch(destination)
        return True

    def probe_ends(self, name: str) -> None:
        destination = self.destinations.get(name)
        if destination is not None and destination.in_flight > 0:
            destination.in_flight -= 1
            self._touch(destination)

    # -- messages becoming ready ------------------------------------------------------------

    def ready(self, queue: str, queue_id: str, *, retry: bool = False) -> None:
        """A message to route and hand out: new, due again, or given back."""
        if queue_id not in self.jobs and queue_id not in self.queued:
            self.queued.add(queue_id)
            (self.retries if retry else self.fresh).append((queue, queue_id))

    def promote_due(self, now: float, where: Callable[[str], str]) -> None:
        """Messages whose retry time has come are ready; `where` says in which queue each waits."""
        for queue_id in self.schedule.pop_due(now):
            self.ready(where(queue_id), queue_id, retry=True)

    def holds(self, queue_id: str) -> bool:
        """Known here: ready, in flight or waiting for room (its file is not to be scheduled by mtime)."""
        return queue_id in self.jobs or queue_id in self.queued

    def in_flight(self, queue_id: str) -> int:
        """The pid of the worker that has it, or 0."""
        job = self.jobs.get(queue_id)
        return job.worker if job else 0

    # -- handing out ----------------------------------------------------------------------

    def dispatch(self, free: dict[int, tuple[str, int]], now: float) -> tuple[list[tuple[int, Task]],
                                                                               list[Suspension]]:
        """One turn: hand out what can go. `free` maps each worker that may take more to its pool
        and its free sessions. Returns the tasks to write (pid, task) and the messages to defer
        without a worker."""
        tasks: list[tuple[int, Task]] = []
        suspensions: list[Suspension] = []
        self._reroute_stale()
        room = dict(free)
        for pool, ids in self.pool_waiting.items():  # those that waited for a worker of their kind first
            for _ in range(len(ids)):
                if not any(p == pool and n for p, n in room.values()):
                    break
                job = self.jobs.get(ids.popleft())
                if job is not None and not job.worker:
                    self._place(job, room, now, tasks, suspensions)
        self._drain_lines(room, now, tasks, suspensions)
        turn = 0
        self.more_ready = bool(self.stale)
        while (self.fresh or self.retries) and any(n for _, n in room.values()):
            if turn == READY_BUDGET:  # the loop has signals, reports and clients to serve too
                self.more_ready = True
                break
            source = self.fresh if (turn % 2 == 0 and self.fresh) or not self.retries else self.retries
            queue, queue_id = source.popleft()  # new mail and retries by turns
            turn += 1
            self.queued.discard(queue_id)
            if queue_id in self.jobs:
                continue
            routed = self.route(queue, queue_id)
            if routed is None:
                continue  # gone meanwhile
            job = self.jobs[queue_id] = Job(queue, queue_id, routed.pool, dict.fromkeys(routed.destinations),
                                            routed.visit_at)
            self._place(job, room, now, tasks, suspensions)
        return tasks, suspensions

    def _drain_lines(self, room: dict[int, tuple[str, int]], now: float, tasks: list[tuple[int, Task]],
                     suspensions: list[Suspension]) -> None:
        """Entries waiting for room go while their destination has room and a worker of their
        kind has a free session."""
        for name in list(self.lined):
            destination = self.destinations[name]
            self._touch(destination)
            while destination.waiting and self._has_room(destination, now):
                queue_id = destination.waiting[0]
                job = self.jobs.get(queue_id)
                if job is None or job.worker:
                    destination.lined.discard(destination.waiting.popleft())  # gone, or went with another entry
                    continue
                if not any(self.destination_of(entry, now) is destination for entry in job.todo):
                    destination.lined.discard(destination.waiting.popleft())  # counted elsewhere since a reload
                    self.pool_waiting.setdefault(job.pool, deque()).append(queue_id)
                    continue
                if not any(p == job.pool and n for p, n in room.values()):
                    break
                destination.lined.discard(destination.waiting.popleft())
                self._place(job, room, now, tasks, suspensions)
                if queue_id in destination.lined:  # back in line: the connection limit, not the window, holds it
                    if destination.waiting[-1] == queue_id:
                        destination.waiting.rotate(1)  # at the head, where it was
                    break
            if not destination.waiting:
                self.lined.discard(name)

    def _place(self, job: Job, room: dict[int, tuple[str, int]], now: float, tasks: list[tuple[int, Task]],
               suspensions: list[Suspension]) -> None:
        """Decide for each entry of a job whether it goes now, is suspended or waits, and act."""
        go: dict[str, Destination] = {}
        suspended: dict[str, tuple[str, float]] = {}
        wait: list[Destination] = []
        unresolved = False
        for entry in job.todo:
            destination = self.destination_of(entry, now)
            if destination is None:
                self.unresolved[entry].add(job.queue_id)
                unresolved = True
            elif destination.dead and (destination.probing or now < destination.dead_until
                                       or self._probe_waits(destination, now)):
                suspended[entry] = (f"delivery temporarily suspended: {destination.label}: "
                                    f"{destination.last_error}", destination.dead_until)
                self._deferred(destination.name, job.queue_id)
            elif self._has_room(destination, now):
                go[entry] = destination
            else:
                wait.append(destination)
        if unresolved or (not go and wait):
            self._wait(job, wait)  # for room, or for a site being looked up: its entries go together
            return
        if not go and suspended and now < job.visit_at:
            self._suspend(job, suspended, suspensions)
            return
        pid = self._worker_for(job, list(go.values()), room)
        if pid is None:
            self.pool_waiting.setdefault(job.pool, deque()).append(job.queue_id)
            return
        number = self.numbers[pid] = self.numbers.get(pid, 0) + 1
        connected = {entry: (destination, self._connect(destination, pid, number, now))
                     for entry, destination in go.items()}
        went = {entry: destination for entry, (destination, how) in connected.items() if how}
        if not went and not suspended:
            self._wait(job, [destination for entry, destination in go.items()])
            return
        pool, free = room[pid]
        room[pid] = (pool, free - 1)
        job.worker, job.going = pid, tuple((entry, destination.name) for entry, destination in went.items())
        for entry in [*went, *suspended]:
            job.todo.pop(entry, None)
            job.done.add(entry)
        task = Task(job.queue, job.queue_id, go=list(went) if job.todo or went or suspended else None,
                    suspended=suspended, later=list(job.todo), due=0.0 if job.due == NEVER else job.due,
                    number=number, reuse=sorted({d.name for d, how in connected.values() if how == REUSE}),
                    continued=job.attempted)
        job.attempted = job.attempted or bool(went)
        tasks.append((pid, task))

    def _worker_for(self, job: Job, go: list[Destination], room: dict[int, tuple[str, int]]) -> int | None:
        """The worker of the job's kind with a free session that keeps idle connections to the
        most of its destinations, then the one with the most free sessions."""
        fits = [pid for pid, (pool, free) in room.items() if pool == job.pool and free]
        if not fits:
            return None
        return max(fits, key=lambda pid: (sum(1 for destination in go if destination.idle(pid)), room[pid][1], -pid))

    def _connect(self, destination: Destination, pid: int, number: int, now: float) -> str:
        """Take a connection to `destination` in worker `pid`: one of its idle ones not promised yet
        (REUSE), or a new one while the limit allows (NEW). If the limit is taken by idle
        connections of other workers, one of them is told to drop its own, and "" says the entry
        waits. A node of a cluster that has more open than its share uses no idle one again until
        enough are closed."""
        if destination.idle(pid) and not (self.shared is not None and self.shared.shedding(destination)):
            destination.promised.setdefault(pid, deque()).append(number)
            how = REUSE
        elif destination.connections >= self._limit(destination):
            holder = next((other for other in destination.kept if destination.idle(other)), None)
            if holder is not None:
                self.drops.setdefault(holder, set()).add(destination.name)
            return ""
        else:
            how = NEW
        destination.in_flight += 1
        self._touch(destination)
        if self.shared is not None:
            self.shared.started(destination)
        if destination.dead and now >= destination.dead_until:
            destination.probing = True
        if destination.limits.rate:
            destination.next_start = max(now, destination.next_start) + 1 / destination.limits.rate
        return how

    def _wait(self, job: Job, destinations: list[Destination]) -> None:
        """Entries of a message not in flight wait in their destinations' lines (while it is in
        flight, `filed` places its entries again when it comes back)."""
        for destination in destinations:
            if job.queue_id not in destination.lined:
                destination.lined.add(job.queue_id)
                destination.waiting.append(job.queue_id)
            self.lined.add(destination.name)
            self._touch(destination)

    def _deferred(self, name: str, queue_id: str) -> None:
        self.destinations[name].deferred.add(queue_id)
        self.deferred_for.setdefault(queue_id, set()).add(name)

    def _not_deferred(self, name: str, queue_id: str) -> None:
        self.destinations[name].deferred.discard(queue_id)
        names = self.deferred_for.get(queue_id)
        if names is not None:
            names.discard(name)
            if not names:
                del self.deferred_for[queue_id]

    def _suspend(self, job: Job, suspended: dict[str, tuple[str, float]], out: list[Suspension]) -> None:
        """Every entry's destination is dead: the message waits in deferred/ until the first probe
        time (spread a little), or until it must be seen for expiry or a delay warning."""
        due = min(min(until for _, until in suspended.values()) + random.uniform(0, SUSPEND_SPREAD), job.visit_at)
        if job.due != NEVER:
            due = min(due, job.due)
        del self.jobs[job.queue_id]
        out.append(Suspension(job.queue, job.queue_id, due, suspended))

    def take_drops(self) -> dict[int, set[str]]:
        drops, self.drops = self.drops, {}
        return drops

    # -- what workers report --------------------------------------------------------------

    def kept(self, pid: int, counts: dict[str, int], read: int) -> None:
        """A worker's idle connections, by destination, less those promised to tasks it has read
        and not begun, counted when it had read task number `read`."""
        for name, count in counts.items():
            destination = self.destinations.get(name)
            if destination is not None:
                destination.kept[pid] = count
                self._touch(destination)
                promised = destination.promised.get(pid)
                while promised and promised[0] <= read:
                    promised.popleft()

    def worker_gone(self, pid: int) -> None:
        """A worker exited: its idle connections went with it, and the sites it was asked for are
        asked of another."""
        for destination in self.destinations.values():
            if destination.kept.pop(pid, None) is not None:
                self._touch(destination)
            destination.promised.pop(pid, None)
        self.drops.pop(pid, None)
        self.numbers.pop(pid, None)
        for entry, (asked, _) in list(self.asked.items()):
            if asked == pid:
                del self.asked[entry]
                self.to_ask.append(entry)

    def finished(self, queue_id: str, reach: dict[str, str], now: float) -> tuple[list[Destination],
                                                                                  list[Destination]]:
        """The entries of a message in flight are done; `reach` says for the destinations tried
        whether they were reached ("") or not (why). Returns the destinations that came back to
        life and those just found dead."""
        job = self.jobs.get(queue_id)
        if job is None or not job.worker:
            return [], []
        revived, died = [], []
        for entry, name in job.going:
            destination = self.get(name)
            busy = destination.in_flight >= int(destination.window) or bool(destination.waiting)
            destination.in_flight = max(0, destination.in_flight - 1)
            self._touch(destination)
            if self.shared is not None and self.shared.shedding(destination):
                self.drop_idle(destination)  # above what this node may have of a cluster's limit: closed as they end
            if entry not in reach:
                destination.probing = False  # a probe that did not get there: the next entry is one
                continue
            if not reach[entry]:
                self._not_deferred(name, queue_id)
                if self._reached(destination, busy):
                    revived.append(destination)
            else:
                self._deferred(name, queue_id)
                if self._unreachable(destination, reach[entry], now):
                    died.append(destination)
        job.worker, job.going = 0, ()
        return revived, died

    def filed(self, queue_id: str, queue: str, next_attempt: float) -> float | None:
        """After a message's attempt left it queued (in `queue`): with entries of its activation
        still waiting it stays here; otherwise the activation is over, and the time to schedule it
        is returned."""
        job = self.jobs.get(queue_id)
        if job is None:
            return next_attempt
        job.due = min(job.due, next_attempt)
        job.queue = queue
        if job.stale and not self._reroute(job):
            job.todo.clear()  # gone meanwhile
        if job.todo:
            self.pool_waiting.setdefault(job.pool, deque()).append(queue_id)  # placed again at the next turn
            return None
        del self.jobs[queue_id]
        return job.due

    def rerouted(self) -> None:
        """The policy in force changed: every message held here is routed by it again, from the
        next turns on, READY_BUDGET a turn (each reads its envelope: a backlog of many thousands
        must not stop the loop), or once its worker has filed it if it is in flight (that worker
        delivers by the old policy, and its entries count against the old destinations until it
        reports). Until then none of them goes. Entries that went in the activation do not go
        again; a message left with none ends its activation."""
        for destination in self.destinations.values():
            if destination.waiting:
                self._touch(destination)
            destination.waiting.clear()
            destination.lined.clear()
        self.lined.clear()
        self.pool_waiting.clear()
        for ids in self.unresolved.values():  # the lookups go on; the messages are placed again when routed
            ids.clear()
        self.stale.clear()
        for job in self.jobs.values():
            job.stale = True
            if not job.worker:
                self.stale.append(job.queue_id)

    def _reroute_stale(self) -> None:
        """Route again a turn's share of the messages held when the policy changed (`rerouted`)."""
        for _ in range(min(len(self.stale), READY_BUDGET)):
            job = self.jobs.get(self.stale.popleft())
            if job is None or not job.stale:
                continue
            if not self._reroute(job):
                del self.jobs[job.queue_id]  # gone meanwhile
            elif job.todo or not job.done:
                self.pool_waiting.setdefault(job.pool, deque()).append(job.queue_id)
            else:  # what its entries go to now all went in this activation, which is over
                del self.jobs[job.queue_id]
                self.schedule.add(job.queue_id, job.due)

    def _reroute(self, job: Job) -> bool:
        """Route a held message again (its kind of worker too may change); False if it is gone."""
        job.stale = False
        routed = self.route(job.queue, job.queue_id)
        if routed is None:
            return False
        job.pool, job.visit_at = routed.pool, routed.visit_at
        job.todo = dict.fromkeys(name for name in routed.destinations if name not in job.done)
        return True

    def forget(self, queue_id: str) -> None:
        """A message is done, held, deleted or set aside: it is nobody's business here any more."""
        self.finished(queue_id, {}, 0.0)  # still in flight: its places are free, and it was no probe
        self.jobs.pop(queue_id, None)
        for name in list(self.deferred_for.get(queue_id, ())):
            self._not_deferred(name, queue_id)
        self.schedule.discard(queue_id)

    def given_back(self, queue_id: str) -> tuple[str, str] | None:
        """A message handed out and not begun (its worker fell silent or is dying): its entries
        are free again; (queue, id) to make it ready anew."""
        job = self.jobs.get(queue_id)
        if job is None:
            return None
        self.finished(queue_id, {}, 0.0)
        del self.jobs[queue_id]
        return job.queue, queue_id

    # -- the window -----------------------------------------------------------------------

    def _reached(self, destination: Destination, busy: bool) -> bool:
        destination.failures = 0
        if destination.dead:
            destination.dead_until, destination.probing, destination.window = 0.0, False, 1.0
            return True
        if busy:
            growth = 1 / destination.window if destination.failed_once else 1.0
            destination.window = min(float(destination.limits.concurrency), destination.window + growth)
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

    def recover(self, destination: Destination, now: float) -> int:
        """A destination came back: the messages deferred for it are retried soon, spread out so
        that it is not flooded. Returns how many."""
        ids = sorted(queue_id for queue_id in destination.deferred if queue_id not in self.jobs)
        for queue_id in list(destination.deferred):
            self._not_deferred(destination.name, queue_id)
        step = min(RECOVERY_SPREAD, MAX_RECOVERY_SPREAD / max(len(ids), 1))
        for i, queue_id in enumerate(ids):
            self.schedule.add(queue_id, now + step * (i + 1))
        return len(ids)

    def forget_idle(self, now: float) -> None:
        """Let go of what a long-running daemon would otherwise pile up: destinations with nothing
        in flight, kept, waiting or deferred that are alive and at their first window (met again,
        one is made anew from its settings), and sites believed no longer."""
        for name, destination in list(self.destinations.items()):
            if not (destination.in_flight or destination.waiting or destination.deferred or destination.dead
                    or destination.failures or any(destination.kept.values()) or any(destination.promised.values())
                    or destination.window != destination.limits.initial_window or destination.next_start > now):
                del self.destinations[name]
                self.lined.discard(name)
        for entry, (_, until) in list(self.sites.items()):
            if until <= now:
                del self.sites[entry]

    # -- the loop's timer and the views ---------------------------------------------------

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until something here is due: a retry, or a rate-limited line's next start."""
        times = [due] if (due := self.schedule.next_due()) is not None else []
        times += [self.destinations[name].next_start for name in self.lined
                  if self.destinations[name].limits.rate]
        times += [when + ASK_AGAIN_SECONDS for _, when in self.asked.values()]
        if any(self.pool_waiting.values()):
            times.append(now + 1.0)  # room comes with a report, which wakes the loop; this is a backstop
        return max(0.0, min(times) - now) if times else None

    def status(self) -> list[dict[str, Any]]:
        """The destinations worth showing: those with anything in progress, kept, waiting or wrong."""
        return [d.status() for d in self.destinations.values()
                if d.in_flight or d.waiting or d.deferred or d.dead or d.failures or any(d.kept.values())]

