"""Destination limits shared by the nodes of a cluster (`cluster-redis`), as the dispatcher sees them.

Several qrouter nodes, each with its own spool, send as one: a destination's `concurrency` and
`rate` from the destinations file hold over all of them together, and a destination one node
finds dead is dead for all until a probe, which only one node makes. The shared state lives in
Redis (router/daemon/redis_link.py says what is kept there); this is the supervisor's side of it,
which the dispatcher asks (`Shared` in router/daemon/dispatcher.py) and which never waits:

- It answers from what the last exchange with Redis left: the leases this node holds (one per
  connection it has or may open at a destination), the rate tokens it was given, which
  destinations other nodes found dead, and whether this node won the right to probe one.
- Each turn of the loop (`tick`) it compares what the destinations need now with what it holds
  and, when that changed, a renewal is due, or a death, revival or probe is to be told, hands a
  request to the link's thread. One request is out at a time; the answer wakes the loop.
- When Redis does not answer (an error or CALL_SECONDS), each node falls back to its own limits
  divided by the number of nodes it last saw (or to its own limits if it never saw any), says so
  once in the log and in `status`, and keeps trying. When Redis answers again the shared state is
  rebuilt: leases are taken again for the connections in use, and the destinations this node
  holds dead are told again. Mail never waits for Redis beyond one call's timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.daemon.dispatcher import Destination, Dispatcher
from router.daemon.redis_link import CALL_SECONDS, LEASE_MS, TOKEN_SECONDS, Answer, RedisLink, Request, Want
from router.logs.lines import QMGR, logger

log = logger(QMGR)

RENEW_SECONDS = LEASE_MS / 1000 / 3  # leases are renewed this often, well before they expire
GAP_SECONDS = 0.02  # at most one exchange this often for changed needs (round trips per message)
REFUSED_SECONDS = 0.1  # after a refusal (no lease, no token), asked again this much later
DOWN_SECONDS = 1.0  # while Redis does not answer, it is tried again this often
CLAIM_SECONDS = 1.0  # a probe asked for and not answered yet: the mail waits this long at most
TOKEN_LIFE = 1.0  # tokens given and not used by then are dropped: they must not pile up into a burst


@dataclass
class _Held:
    """What this node holds of a destination's shared limits."""

    leases: int = 0
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
        self.nodes = 0  # nodes seen at the last answer
        self.out: Request | None = None  # the request the link is working on
        self.sent_at = 0.0
        self.answered_at = 0.0
        self.refused = False
        self.last_wants: dict[str, Want] = {}
        self.published: dict[str, float] = {}  # destinations whose death Redis knows -> until
        self.claims: set[str] = set()  # dead destinations whose probe is this node's
        self.to_claim: set[str] = set()
        self.others_probe: dict[str, float] = {}  # destination -> until when another node probes it
        self.shed: set[str] = set()  # destinations with more open than the leases Redis gave back after an outage

    def fds(self) -> list[int]:
        return self.link.fds()

    # -- what the dispatcher asks ---------------------------------------------------------

    def concurrency(self, destination: Destination) -> int:
        """Connections this node may have to the destination: the leases it holds, or its share."""
        limit = destination.limits.concurrency
        if self.up is None:
            return 0
        if not self.up:
            return max(1, limit // max(1, self.nodes))
        return min(limit, self._held(destination.name).leases)

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
        """More open than this node's share: while Redis is down, or since it came back with fewer
        leases than the connections open."""
        if self.up is False:
            return destination.open > self.concurrency(destination)
        return destination.name in self.shed

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
        if self.out is not None:
            return None
        if self.up is None:
            return 0.0
        if not self.up:
            return max(0.0, self.sent_at + DOWN_SECONDS - now)
        if self.to_claim or self._deaths() or self._revivals():
            return 0.0
        renew = self.answered_at + RENEW_SECONDS
        if self._wants() != self.last_wants or any(self._needs_more(name, want) for name, want in
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

    def _wants(self) -> dict[str, Want]:
        """What each destination needs: a lease per connection it has, and one per entry waiting
        that its window would let go; tokens for the entries waiting at a rate-limited one."""
        wants: dict[str, Want] = {}
        for name, destination in self.dispatcher.destinations.items():
            limit = destination.limits.concurrency
            room = max(0, int(destination.window) - destination.in_flight)
            leases = min(limit, destination.connections + min(len(destination.waiting), room))
            rate = destination.limits.rate
            tokens = min(len(destination.waiting), max(1, int(rate * TOKEN_SECONDS))) if rate else 0
            if leases or tokens or self._held(name).leases:
                wants[name] = Want(limit, leases, rate, tokens)
        for name in self.held.keys() - wants.keys():
            if self.held[name].leases:  # forgotten by the dispatcher: its leases are given back
                wants[name] = Want(self.held[name].leases, 0)
            elif name not in self.dispatcher.destinations:
                del self.held[name]
        return wants

    def _needs_more(self, name: str, want: Want) -> bool:
        held = self.held.get(name)
        return held is not None and (want.leases > held.leases or (want.tokens > 0 and held.tokens <= 0))

    def _deaths(self) -> dict[str, tuple[float, str]]:
        """Destinations this node found dead (or found dead again) that Redis has not been told of."""
        return {name: (d.dead_until, d.last_error) for name, d in self.dispatcher.destinations.items()
                if d.dead and not d.probing and self.published.get(name) != d.dead_until}

    def _revivals(self) -> list[str]:
        """Destinations Redis holds dead that a probe of this node found alive."""
        return [name for name in self.published
                if (d := self.dispatcher.destinations.get(name)) is None or not d.dead]

    def _request(self, now: float) -> Request:
        wants = self._wants()
        self.last_wants = wants
        deaths = self._deaths()
        alive = self._revivals()
        for name in alive:
            del self.published[name]
        self.published.update({name: until for name, (until, _) in deaths.items()})
        watch = {name: d.dead_until if d.dead else 0.0 for name, d in self.dispatcher.destinations.items()
                 if d.dead or d.in_flight or d.waiting}
        claim, self.to_claim = sorted(self.to_claim), set()
        self.others_probe = {name: until for name, until in self.others_probe.items() if until > now}
        return Request(wants, deaths, alive, claim, watch, self.dispatcher.probe_seconds)

    def _went_down(self, error: str, now: float) -> None:
        """Redis did not answer: from now on each destination's share of its limit (see
        `concurrency`); the idle connections beyond it are closed."""
        if self.up is not False:
            self.down_since = now
            log.warning("cluster: redis at %s unreachable (%s); limits divided by %d node(s) last seen until it "
                        "answers", self.url, error, max(1, self.nodes))
        self.up = False
        self.published.clear()  # told again once it answers: it may have lost everything
        self.claims.clear()
        self.to_claim.clear()
        for held in self.held.values():
            held.leases = held.tokens = 0
        for destination in self.dispatcher.destinations.values():
            if destination.open > self.concurrency(destination):
                self.dispatcher.drop_idle(destination)

    def _apply(self, request: Request, answer: Answer, now: float) -> list[Destination]:
        """Believe what Redis answered: leases, tokens, who else waits, dead or alive."""
        rebuilt = self.up is False
        if rebuilt:
            log.info("cluster: redis at %s answers again after %.0fs; shared limits rebuilt", self.url,
                     now - self.down_since)
        elif self.up is None:
            log.info("cluster: node %s, redis at %s, %d node(s)", self.node, self.url, answer.nodes)
        self.up = True
        self.nodes = answer.nodes
        self.answered_at = now
        self.refused = False
        for name, leases in answer.leases.items():
            held = self._held(name)
            held.leases = leases
            self.refused = self.refused or leases < request.wants[name].leases
            destination = self.dispatcher.destinations.get(name)
            if destination is None or destination.open <= leases:
                self.shed.discard(name)
            elif rebuilt:
                self.shed.add(name)
        for name, tokens in answer.tokens.items():
            held = self._held(name)
            held.tokens, held.tokens_until = tokens, now + TOKEN_LIFE
            self.refused = self.refused or tokens < request.wants[name].tokens
        for name, destination in self.dispatcher.destinations.items():
            if (name in answer.contended and not destination.waiting) or name in self.shed:
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
