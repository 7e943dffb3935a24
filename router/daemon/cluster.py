"""Destination limits shared by the nodes of a cluster (`cluster-redis`), as the dispatcher sees them.

Several qrouter nodes, each with its own spool, send as one: a destination's `concurrency` and
`rate` from the destinations file hold over all of them together, and a destination one node
finds dead is dead for all until a probe, which only one node makes. The shared state lives in
Redis (router/daemon/redis_link.py says what is kept there); this is the supervisor's side of it,
which the dispatcher asks (`Shared` in router/daemon/dispatcher.py) and which never waits:

- It answers from what the last exchange with Redis left: the leases this node holds (one per
  connection it has or may open at a destination), how many it may use (its fair share while
  another node waits for room there, else the limit), the rate tokens it was given, which
  destinations other nodes found dead, and whether this node won the right to probe one.
- A node whose allowance went down below the connections it has open (leases above its fair
  share, or its part while Redis is down and just after) is `shedding`: a connection whose
  delivery ends is closed rather than given the next message, and it keeps the lease until then,
  so the destination never sees more than the limit. No delivery is cut short.
- Each turn of the loop (`tick`) it compares what the destinations need now with what it holds
  and, when that changed, a renewal is due, or a death, revival or probe is to be told, hands a
  request to the link's thread. One request is out at a time; the answer wakes the loop.
- It looks only at the destinations that have something for Redis: connections, a line, leases,
  demand or tokens, or a death or revival not told yet. The dispatcher says which destinations
  changed (`Dispatcher.take_changed`), so a turn costs what is in progress, not the thousands of
  destinations a relay may hold deferred mail for. Whether another node revived a destination
  that is dead here is read with every request while this node has mail in flight or waiting for
  it, and for the others (mail deferred only) with the renewals, every RENEW_SECONDS.
- When Redis does not answer (an error or CALL_SECONDS), each node falls back to its own limits
  divided by the number of nodes it last saw (or to its own limits if it never saw any), the
  remainder to the first nodes by name so that the parts add up to the limit, says so once in
  the log and in `status`, and keeps trying. Connections above its part are shed as above.
  When Redis answers again the shared state is rebuilt: leases are taken again for the
  connections in use, and the destinations this node holds dead are told again. Mail never waits
  for Redis beyond one call's timeout, but at a destination whose limit is smaller than the
  number of nodes, where the nodes whose part is 0 wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.daemon.dispatcher import Destination, Dispatcher
from router.daemon.redis_link import CALL_SECONDS, LEASE_MS, TOKEN_SECONDS, Answer, RedisLink, Request, Want
from router.logs.lines import QMGR, logger

log = logger(QMGR)

RENEW_SECONDS = LEASE_MS / 1000 / 3  # leases are renewed this often, well before they expire
FAIR_SECONDS = 0.5  # ... and this often by a node holding more than an even split: it hears soon of a node refused
GAP_SECONDS = 0.02  # at most one exchange this often for changed needs (round trips per message)
REFUSED_SECONDS = 0.1  # after a refusal (no lease, no token), asked again this much later
DOWN_SECONDS = 1.0  # while Redis does not answer, it is tried again this often
DEMAND_SECONDS = 2.0  # a demand told to Redis is its highest of this long: a dip would shift the others' shares
SETTLE_SECONDS = DOWN_SECONDS + 2 * CALL_SECONDS  # after an outage, until every node has told Redis its connections
CLAIM_SECONDS = 1.0  # a probe asked for and not answered yet: the mail waits this long at most
TOKEN_LIFE = 1.0  # tokens given and not used by then are dropped: they must not pile up into a burst


@dataclass
class _Held:
    """What this node holds of a destination's shared limits."""

    leases: int = 0
    allowed: int | None = None  # leases it may use, as Redis last said (None: not said yet, the limit)
    demand: int = 0  # the highest demand of the last DEMAND_SECONDS, and since when it is that high
    demand_at: float = 0.0
    tokens: int = 0
    tokens_until: float = 0.0
    local_tokens: float = 0.0  # while Redis is down: this node's own bucket at its share of the rate
    local_at: float = 0.0


class Cluster:
    """The shared state of the destinations, for the dispatcher (see the module's docstring)."""

    def __init__(self, url: str, node: str, dispatcher: Dispatcher) -> None:
        self.url = _redacted(url)
        self.node = node
        self.dispatcher = dispatcher
        self.link = RedisLink(url, node)
        self.held: dict[str, _Held] = {}
        self.up: bool | None = None  # None until the first answer
        self.down_since = 0.0
        self.settling_until = 0.0  # while Redis is down, and for SETTLE_SECONDS after: no more than its part
        self.nodes = 0  # nodes seen at the last answer
        self.rank = 0  # this node's place among them, by name
        self.out: Request | None = None  # the request the link is working on
        self.sent_at = 0.0
        self.answered_at = 0.0
        self.refused = False
        self.last_wants: dict[str, Want] = {}
        self.watched: set[str] = set()  # destinations with something for Redis (see the module's docstring)
        self.dead_read_at = 0.0  # when the dead state of every destination dead here was last read
        self.published: dict[str, float] = {}  # destinations whose death Redis knows -> until
        self.claims: set[str] = set()  # dead destinations whose probe is this node's
        self.to_claim: set[str] = set()
        self.others_probe: dict[str, float] = {}  # destination -> until when another node probes it

    def fds(self) -> list[int]:
        return self.link.fds()

    # -- what the dispatcher asks ---------------------------------------------------------

    def concurrency(self, destination: Destination) -> int:
        """Connections this node may have to the destination: the leases it holds and may use, or
        while Redis is down its part of the limit."""
        limit = destination.limits.concurrency
        if self.up is None:
            return 0
        if not self.up:
            return self._part(limit)
        held = self._seen(destination.name)
        return min(limit, held.leases, self._allowed(limit, held))

    def may_start(self, destination: Destination, now: float) -> bool:
        """Whether a rate-limited destination may start an entry now: a token from the cluster's
        bucket, or while Redis is down one of this node's share."""
        rate = destination.limits.rate
        if not rate:
            return True
        held = self._held(destination.name)
        if self.up:
            return held.tokens > 0 and now < held.tokens_until
        if self.up is None:
            return False
        share = rate / max(1, self.nodes)
        held.local_tokens = min(1.0, held.local_tokens + (now - held.local_at) * share) if held.local_at else 1.0
        held.local_at = now
        return held.local_tokens >= 1.0

    def started(self, destination: Destination) -> None:
        """An entry started: it spent a token of a rate-limited destination."""
        if destination.limits.rate:
            held = self._held(destination.name)
            if self.up:
                held.tokens = max(0, held.tokens - 1)
            else:
                held.local_tokens -= 1.0

    def shedding(self, destination: Destination) -> bool:
        """More open than this node may have because what it may have went down: leases above its
        fair share while another node waits there, or its part while Redis is down and just after.
        Not merely more open than its leases by the dispatcher's count: a worker's count of its
        idle connections lags (it may have given one to a delivery sent as a new connection), and
        closing connections for that would close them for nothing, again and again."""
        if destination.open <= self.concurrency(destination):
            return False
        if not self.up or self.settling_until:
            return True
        held = self._seen(destination.name)
        return held.allowed is not None and held.allowed < held.leases

    def probe_wait(self, destination: Destination, now: float) -> float | None:
        """A dead destination's probe time has come here: None if this node is to probe it, else
        until when its mail waits (another node probes it, or Redis is being asked who does)."""
        if not self.up:
            return None  # no Redis: each node probes on its own, as without a cluster
        name = destination.name
        if name in self.claims:
            self.claims.discard(name)
            return None
        self.to_claim.add(name)
        until = self.others_probe.get(name, 0.0)
        until = until if until > now else now + CLAIM_SECONDS
        self.published[name] = until  # the dispatcher waits until then: no death to tell Redis of
        return until

    # -- the loop's turn ------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Hand the link a request if one is due (see the module's docstring)."""
        if self.up and self.settling_until and now >= self.settling_until:
            self.settling_until = 0.0  # every node has told Redis of its connections by now
        due = self.next_due(now)
        if due is None or due > 0:
            return
        self.out = self._request(now)
        self.sent_at = now
        for name, want in self.out.wants.items():  # what is being given back is not used meanwhile
            held = self._held(name)
            held.leases = min(held.leases, want.leases)
        self.link.send(self.out)

    def next_due(self, now: float) -> float | None:
        """Seconds until a request is due (0: now), None while one is out."""
        self.watched |= self.dispatcher.take_changed()
        if self.out is not None:
            return None
        if self.up is None:
            return 0.0
        if not self.up:
            return max(0.0, self.sent_at + DOWN_SECONDS - now)
        if self.to_claim or self._deaths() or self._revivals():
            return 0.0
        renew = self.answered_at + (FAIR_SECONDS if self._above_even_split() else RENEW_SECONDS)
        if self.settling_until:
            renew = min(renew, self.settling_until)
        if self._wants(now) != self.last_wants or any(self._needs_more(name, want) for name, want in
                                                   self.last_wants.items()):
            return max(0.0, min(renew, self.sent_at + (REFUSED_SECONDS if self.refused else GAP_SECONDS)) - now)
        return max(0.0, renew - now)

    def answered(self, now: float) -> list[Destination]:
        """Take in the link's answers; returns the destinations that came back to life elsewhere
        (the caller retries their deferred mail, as after a probe of its own)."""
        revived: list[Destination] = []
        for answer in self.link.take():
            request, self.out = self.out, None
            if request is None:
                continue
            if answer.error:
                self._went_down(answer.error, now)
            else:
                revived += self._apply(request, answer, now)
        return revived

    def close(self) -> None:
        """Give back this node's leases (bounded: unanswered, they expire by themselves)."""
        last = Request({name: Want(want.limit, 0) for name, want in self.last_wants.items()}) if self.up else None
        self.link.close(last, CALL_SECONDS if last else 0.0)

    def status(self) -> dict[str, Any]:
        state = "starting" if self.up is None else "ok" if self.up else "unreachable"
        return {"node": self.node, "redis": self.url, "state": state, "nodes": self.nodes,
                "down_since": self.down_since if self.up is False else None,
                "divided_by": max(1, self.nodes) if self.up is False else None,
                "round_trips": self.link.round_trips, "leases": sum(h.leases for h in self.held.values())}

    # -- requests and answers -------------------------------------------------------------

    def _held(self, name: str) -> _Held:
        held = self.held.get(name)
        if held is None:
            held = self.held[name] = _Held()
        return held

    def _seen(self, name: str) -> _Held:
        """What this node holds of the destination, to read: nothing is kept for one never asked for."""
        return self.held.get(name) or _Held()

    def _part(self, limit: int) -> int:
        """This node's part of a limit while Redis is down: divided by the nodes last seen, the
        remainder to the first by name, so that the parts add up to the limit (a node whose part
        is 0 sends none of the destination's mail until Redis answers)."""
        nodes = max(1, self.nodes)
        return limit // nodes + (1 if self.rank < limit % nodes else 0)

    def _allowed(self, limit: int, held: _Held) -> int:
        """Connections this node may use at a destination if it holds the leases: what Redis last
        said (its fair share, or the limit), and no more than its part while Redis is down and for
        SETTLE_SECONDS after it answers again: until every node has taken leases again for the
        connections it has, the first to ask would otherwise be given room the others are using."""
        allowed = limit if held.allowed is None else held.allowed
        return min(allowed, self._part(limit)) if self.settling_until else allowed

    def _above_even_split(self) -> bool:
        """Holding more leases somewhere than an even split among the nodes seen: a node refused
        there must hear of its fair share soon, so this node asks Redis more often."""
        return self.nodes > 1 and any(
            self._seen(name).leases > -(-destination.limits.concurrency // self.nodes)
            for name in self.last_wants if (destination := self.dispatcher.destinations.get(name)) is not None)

    def _wants(self, now: float) -> dict[str, Want]:
        """What each destination needs: its demand (a connection per connection it has, and one per
        entry waiting that its window would let go; the highest of the last DEMAND_SECONDS), as
        leases as much of that as this node may use but never fewer than the connections the server
        sees (given back as they close), and tokens for the entries waiting at a rate-limited one."""
        wants: dict[str, Want] = {}
        for name in list(self.watched):
            destination = self.dispatcher.destinations.get(name)
            if destination is None:
                held = self.held.get(name)
                if held is not None and held.leases:  # forgotten by the dispatcher: its leases are given back
                    wants[name] = Want(held.leases, 0)
                elif not self._untold(name, None):
                    self._unwatch(name)
                continue
            limit = destination.limits.concurrency
            room = max(0, int(destination.window) - destination.in_flight)
            demand = min(limit, destination.connections + min(len(destination.waiting), room))
            held = self._held(name)
            if demand >= held.demand or now - held.demand_at >= DEMAND_SECONDS:
                held.demand, held.demand_at = demand, now
            demand = held.demand
            leases = min(demand, max(min(destination.open, held.leases), self._allowed(limit, held)))
            rate = destination.limits.rate
            tokens = min(len(destination.waiting), max(1, int(rate * TOKEN_SECONDS))) if rate else 0
            if demand or tokens or held.leases:
                wants[name] = Want(limit, leases, rate, tokens, demand)
            elif not (destination.connections or destination.waiting or self._untold(name, destination)):
                self._unwatch(name)
        return wants

    def _unwatch(self, name: str) -> None:
        """Nothing left to tell Redis of the destination: looked at again when it changes."""
        self.watched.discard(name)
        self.held.pop(name, None)

    def _untold(self, name: str, destination: Destination | None) -> bool:
        """A death or revival of the destination here that Redis has not been told of."""
        return ((destination is not None and self._death_untold(name, destination))
                or self._revival_untold(name, destination))

    def _death_untold(self, name: str, destination: Destination) -> bool:
        """Found dead here (or dead again: its probe time moved), and Redis not told so."""
        return destination.dead and not destination.probing and self.published.get(name) != destination.dead_until

    def _revival_untold(self, name: str, destination: Destination | None) -> bool:
        """Alive here again (or forgotten), while Redis was told it is dead."""
        return name in self.published and (destination is None or not destination.dead)

    def _needs_more(self, name: str, want: Want) -> bool:
        held = self.held.get(name)
        return held is not None and (want.leases > held.leases or (want.tokens > 0 and held.tokens <= 0))

    def _deaths(self) -> dict[str, tuple[float, str]]:
        """Destinations this node found dead (or found dead again) that Redis has not been told of."""
        return {name: (d.dead_until, d.last_error) for name in self.watched
                if (d := self.dispatcher.destinations.get(name)) is not None and self._death_untold(name, d)}

    def _revivals(self) -> list[str]:
        """Destinations Redis holds dead that a probe of this node found alive."""
        return [name for name in self.watched if self._revival_untold(name, self.dispatcher.destinations.get(name))]

    def _request(self, now: float) -> Request:
        wants = self._wants(now)
        self.last_wants = wants
        deaths = self._deaths()
        alive = self._revivals()
        for name in alive:
            del self.published[name]
        self.published.update({name: until for name, (until, _) in deaths.items()})
        destinations = self.dispatcher.destinations
        watch = {name: d.dead_until if d.dead else 0.0 for name in self.watched
                 if (d := destinations.get(name)) is not None and (d.dead or d.in_flight or d.waiting)}
        if now >= self.dead_read_at + RENEW_SECONDS:  # the dead ones with deferred mail only: revived elsewhere?
            self.dead_read_at = now
            watch.update({name: d.dead_until for name in self.published
                          if (d := destinations.get(name)) is not None and d.dead})
        claim, self.to_claim = sorted(self.to_claim), set()
        self.others_probe = {name: until for name, until in self.others_probe.items() if until > now}
        return Request(wants, deaths, alive, claim, watch, self.dispatcher.probe_seconds)

    def _went_down(self, error: str, now: float) -> None:
        """Redis did not answer: from now on each destination's part of its limit (see `_part`);
        the idle connections beyond it are closed, and those in use as their deliveries end."""
        if self.up is not False:
            self.down_since = now
            log.warning("cluster: redis at %s unreachable (%s); limits divided by %d node(s) last seen until it "
                        "answers", self.url, error, max(1, self.nodes))
        self.up = False
        self.settling_until = float("inf")
        self.watched.update(self.published)  # told again once it answers: it may have lost everything
        self.published.clear()
        self.claims.clear()
        self.to_claim.clear()
        for held in self.held.values():
            held.leases = held.tokens = 0
            held.allowed = None
        self.watched |= self.dispatcher.take_changed()
        for name in self.watched:  # every destination with connections is watched
            destination = self.dispatcher.destinations.get(name)
            if destination is not None and self.shedding(destination):
                self.dispatcher.drop_idle(destination)

    def _apply(self, request: Request, answer: Answer, now: float) -> list[Destination]:
        """Believe what Redis answered: leases, tokens, who else waits, dead or alive."""
        rebuilt = self.up is False
        if rebuilt:
            self.settling_until = now + SETTLE_SECONDS
            log.info("cluster: redis at %s answers again after %.0fs; shared limits rebuilt", self.url,
                     now - self.down_since)
        elif self.up is None:
            log.info("cluster: node %s, redis at %s, %d node(s)", self.node, self.url, answer.nodes)
        self.up = True
        if not self.settling_until:  # while settling, the parts stay those of the nodes seen before the outage
            self.nodes, self.rank = answer.nodes, answer.rank
        self.answered_at = now
        self.refused = False
        for name, leases in answer.leases.items():
            held = self._held(name)
            held.leases, held.allowed = leases, answer.allowed[name]
            self.refused = self.refused or leases < request.wants[name].leases
        for name, tokens in answer.tokens.items():
            held = self._held(name)
            held.tokens, held.tokens_until = tokens, now + TOKEN_LIFE
            self.refused = self.refused or tokens < request.wants[name].tokens
        for name in request.wants:  # every destination with connections is among them
            destination = self.dispatcher.destinations.get(name)
            if destination is not None and ((name in answer.contended and not destination.waiting)
                                            or self.shedding(destination)):
                self.dispatcher.drop_idle(destination)
        return self._dead_states(request, answer, now)

    def _dead_states(self, request: Request, answer: Answer, now: float) -> list[Destination]:
        """What Redis says of dead destinations, applied here: dead for all, who probes, revived."""
        revived: list[Destination] = []
        for name, shared in answer.dead.items():
            destination = self.dispatcher.destinations.get(name)
            if destination is None or destination.probing:
                continue
            prober, left = answer.probes.get(name, ("", 0.0))
            probing_elsewhere = 0.0
            if prober == self.node and name in request.claim:
                self.claims.add(name)
            elif prober:
                probing_elsewhere = self.others_probe[name] = now + left
            if shared is None:
                was = request.watch.get(name, 0.0)
                if destination.dead and was and destination.dead_until == was and name not in request.dead:
                    self.published.pop(name, None)
                    if self.dispatcher.revived_elsewhere(destination):
                        revived.append(destination)
                continue
            until, why, node = shared
            until = max(until, probing_elsewhere)
            if until <= now:
                continue  # its probe is due: the node that claims it first makes it
            if not destination.dead:
                log.warning("destination %s is not reachable (%s, found by node %s); its mail waits without new "
                            "attempts until a probe", destination.label, why, node)
                destination.last_error = why
            destination.dead_until = max(destination.dead_until, until)
            self.published[name] = destination.dead_until
        return revived


def _redacted(url: str) -> str:
    """The URL without its password, for logs and status."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user + ':' if user else ''}***@{host}"
