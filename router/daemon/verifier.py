"""The daemon's side of recipient verification: the `verify` request of the status socket.

    {"command": "verify", "recipient": "user@example.org", "sender": "a@example.net"}
    -> {"verdict": "refused", "code": 550, "dsn": "5.1.1", "text": "...", "recipient": ...}

The verdict is the one delivery would reach (policy/verify.py), by the policy in force. A verdict
of the policy alone (an alias, a rule, a next hop) is answered at once from the supervisor's loop,
in microseconds. Two kinds of verdict need the network, and the supervisor's loop never waits
for it: the question goes to a network worker, whose lookup threads ask as delivery asks, and
the client holds a `Later` answer of the status socket until the worker's reply comes back.

- MX routing needs DNS: the worker asks with delivery's resolver and cache of answers.
  Clients asking about the same domain meanwhile share one question.
- A destination with `callout=yes` (the destinations file) is asked itself: a probe connects as
  delivery does and says MAIL FROM, RCPT TO, RSET, QUIT, never DATA. Its results are kept in
  the spool (router/daemon/verify_cache.py) and given from there, and probed again in the background
  once due. One probe per address is in flight however many ask; one probe at a time per
  destination, at most its `callout-rate`, and only when its window in the dispatcher has a
  place (a probe takes one, as a delivery does): the rest wait their turn.

A client whose answer has not come within `verify-wait` seconds hears a temporary verdict, never
nothing: `450 4.4.3` while DNS has not answered, `450 4.1.1` while a probe is in progress (as
Postfix answers while address verification is pending); the probe goes on, and its result
answers the client's next try. Nothing is queued, and nothing is logged per request: the front
door logs its refusals, and the daemon counts verdicts and cache hits (`status`, metrics).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from policy.rewriting import TO
from policy.routing import Policy
from policy.verify import RESULTS, TEMPORARY, Verdict, from_dns, from_status, judge, needs_callout
from router.config import Config
from router.daemon.dispatcher import Dispatcher
from router.daemon.status_socket import CONNECTION_SECONDS, Later, StatusError, StatusServer, query
from router.daemon.verify_cache import Lifetimes, VerifyCache
from router.spool.address import AddressError, parse_path

if TYPE_CHECKING:
    from router.daemon.metrics import Metrics

ASK_SECONDS = 10.0  # a front door's wait for a verdict; the daemon answers within its socket's deadline
MAX_ADDRESS = 1000  # characters of a request's address looked at: a valid one has at most 256 octets
LOOK_AGAIN_SECONDS = 1.0  # a probe held back by a full window or no worker is tried again this soon (a report
# that frees a place wakes the loop sooner)
LONGEST_WAIT = CONNECTION_SECONDS - 0.5  # verify-wait, at most: the client must hear before its socket's deadline
MAX_WAITING_PROBES = 1000  # addresses waiting for a probe to one destination; more are not probed now
PENDING = "4.1.1", "address verification in progress"


class VerifyError(ValueError):
    """A verify request that cannot be answered; the message says why."""


def address_of(request: dict[str, Any], field: str, null_ok: bool = False) -> str:
    """The mailbox in request[field], checked as every front door checks addresses."""
    text = request.get(field, "" if null_ok else None)
    if not isinstance(text, str):
        raise VerifyError(f"bad request: '{field}' must be an address")
    if len(text) > MAX_ADDRESS:
        raise VerifyError(f"bad request: '{field}' is longer than {MAX_ADDRESS} characters")
    try:
        return parse_path(text, null_ok=null_ok)
    except AddressError as exc:
        raise VerifyError(f"bad request: {exc}") from None


class Verifier:
    """Answers `verify` requests, runs the callouts, and counts verdicts. `ask_worker(record)`
    writes a record to a network worker's task pipe and returns its pid, 0 when none can be asked;
    the worker's answers come to `dns_answered` and `callout_answered`. A probe counts against its
    destination's window in the dispatcher, as a delivery does. `tick` is called at every
    turn of the supervisor's loop, which sleeps no longer than `next_due` says."""

    def __init__(self, server: StatusServer, ask_worker: Callable[[dict[str, Any]], int], dispatcher: Dispatcher,
                 config: Config, metrics: Metrics | None = None) -> None:
        self.server = server
        self.ask_worker = ask_worker
        self.dispatcher = dispatcher  # a probe takes a place in its destination's window
        self.metrics = metrics
        self.wait = min(config.verify_wait, LONGEST_WAIT)
        self.cache = VerifyCache(config.queue_dir, Lifetimes(config), time.time())
        self.counts = dict.fromkeys(RESULTS, 0)
        self.hits = self.misses = 0  # callout verdicts given from the cache, and those that needed a probe
        self.deadlines: dict[str, float] = {}  # Later key -> when its clients hear a temporary verdict
        self.waiting: dict[str, deque[str]] = {}  # destination -> the addresses to probe, in turn
        self.in_flight: dict[str, tuple[str, int]] = {}  # key -> (destination, worker pid) of a probe
        self.busy: set[str] = set()  # destinations with a probe in flight
        self.next_probe: dict[str, float] = {}  # destination -> earliest start of its next probe (callout-rate)
        self.interval: dict[str, float] = {}  # destination -> seconds between its probes (callout-rate)

    def reconfigure(self, config: Config) -> None:
        self.wait = min(config.verify_wait, LONGEST_WAIT)
        self.cache.set_lifetimes(Lifetimes(config))

    def answer(self, request: dict[str, Any], policy: Policy) -> dict[str, Any] | Later:
        try:
            recipient = address_of(request, "recipient")
            address_of(request, "sender", null_ok=True)  # checked; no verdict depends on it
        except VerifyError as exc:
            return {"error": str(exc)}
        rewritten = policy.rewriter.rewrite(TO, recipient)[0]
        route = policy.route_queued(rewritten, rewritten=True)  # as delivery routes it, rewritten once
        about = {"recipient": recipient, "rewritten": rewritten, "route": route.reason}
        if needs_callout(route, policy):
            return self._callout(rewritten, route.next_hop.destination, policy, about)
        verdict = judge(route)
        if verdict is not None:
            return self._counted(verdict, about)
        domain = route.next_hop.argument  # MX routing to this domain
        key = f"domain:{domain}"
        if not self.server.awaited(key) and not self.ask_worker({"verify": [domain]}):
            return self._counted(Verdict(TEMPORARY, "4.3.0", "no worker to ask DNS now"), about)

        def finish(failure: Any) -> dict[str, Any]:
            if failure is None:
                return self._counted(Verdict(TEMPORARY, "4.4.3", f"no DNS answer for {domain} in time"), about)
            return self._counted(from_dns(domain, tuple(failure) if failure else None), about)

        return self._later(key, finish)

    def dns_answered(self, domain: str, failure: list[str] | None) -> None:
        """A worker's answer about `domain`: None when it has hosts to try, else [code, text]."""
        self._settle(f"domain:{domain}", failure or [])

    def callout_answered(self, key: str, answer: list[str]) -> None:
        """A worker's probe of `key` ended with [code, text]: kept, and given to those waiting."""
        flight = self.in_flight.pop(key, None)
        if flight is None:  # from a worker given up on
            return
        self.busy.discard(flight[0])
        self.dispatcher.probe_ends(flight[0])
        dsn, text = answer
        self.cache.put(key, dsn, text, time.time())
        self._settle(f"callout:{key}", [dsn, text])
        self._start_probes(time.time())

    def worker_gone(self, pid: int) -> None:
        """The probes a dead worker had are given up: their addresses are probed when asked again."""
        for key, (destination, asked) in list(self.in_flight.items()):
            if asked == pid:
                del self.in_flight[key]
                self.busy.discard(destination)
                self.dispatcher.probe_ends(destination)
        self._start_probes(time.time())

    def tick(self, now: float) -> None:
        """Answer the clients whose wait is over, and start the probes whose turn has come."""
        for key in [key for key, due in self.deadlines.items() if due <= now]:
            self._settle(key, None)
        self._start_probes(now)

    def next_due(self, now: float) -> float | None:
        """Seconds until `tick` has something to do; None when nothing is waiting."""
        dues = [*self.deadlines.values(), *(self.next_probe.get(destination, 0.0)
                                            for destination, queue in self.waiting.items()
                                            if queue and destination not in self.busy)]
        return max(0.0, min(dues) - now) if dues else None

    def status(self) -> dict[str, Any]:
        asked = self.hits + self.misses
        return {**self.counts, "cache": len(self.cache.entries), "hits": self.hits, "misses": self.misses,
                "hit_rate": round(self.hits / asked, 4) if asked else None, "probes": len(self.in_flight)}

    def close(self) -> None:
        self.cache.close()

    def fds(self) -> list[int]:
        """The descriptors it holds, for a forked worker to close."""
        return [self.cache.fd] if self.cache.fd >= 0 else []

    # -- callouts ----------------------------------------------------------------------------

    def _callout(self, address: str, destination: str, policy: Policy, about: dict[str, Any]) -> dict[str, Any] | Later:
        now = time.time()
        result = self.cache.get(address, now)
        if result is not None:
            self.hits += 1
            if self.cache.lifetimes.refresh_due(result, now):
                self._want_probe(address, destination, policy, now)
            return self._counted(from_status(result.dsn, result.text), about)
        self.misses += 1
        self._want_probe(address, destination, policy, now)

        def finish(answer: Any) -> dict[str, Any]:
            return self._counted(from_status(*(answer or PENDING)), about)

        return self._later(f"callout:{address}", finish)

    def _want_probe(self, address: str, destination: str, policy: Policy, now: float) -> None:
        """Put `address` in line for a probe of its destination, unless it is in line or in flight."""
        if address in self.in_flight:
            return
        queue = self.waiting.setdefault(destination, deque())
        if len(queue) >= MAX_WAITING_PROBES or address in queue:
            return
        queue.append(address)
        rate = policy.destinations.for_destination(destination).callout_rate
        self.interval[destination] = 1.0 / rate if rate else 0.0
        self._start_probes(now)

    def _start_probes(self, now: float) -> None:
        """Hand out the next probe of each destination that has none in flight, and whose
        callout-rate allows one now."""
        for destination, queue in list(self.waiting.items()):
            if destination in self.busy or self.next_probe.get(destination, 0.0) > now:
                continue
            if not queue:  # nothing more for it, and its rate no longer holds anything back
                del self.waiting[destination]
                self.next_probe.pop(destination, None)
                self.interval.pop(destination, None)
                continue
            if not self.dispatcher.probe_begins(destination):  # its window is full
                self.next_probe[destination] = now + LOOK_AGAIN_SECONDS
                continue
            address = queue[0]
            pid = self.ask_worker({"callout": [{"key": address, "recipient": address}]})
            if not pid:  # no worker now
                self.dispatcher.probe_ends(destination)
                self.next_probe[destination] = now + LOOK_AGAIN_SECONDS
                continue
            queue.popleft()
            self.in_flight[address] = (destination, pid)
            self.busy.add(destination)
            self.next_probe[destination] = now + self.interval.get(destination, 0.0)

    # -- answers -------------------------------------------------------------------------------

    def _later(self, key: str, finish: Callable[[Any], dict[str, Any]]) -> Later:
        """An answer that waits for `key`, at most `verify-wait` seconds from the first client."""
        self.deadlines.setdefault(key, time.time() + self.wait)
        return Later(key, finish)

    def _settle(self, key: str, result: Any) -> None:
        self.deadlines.pop(key, None)
        self.server.settle(key, result)

    def _counted(self, verdict: Verdict, about: dict[str, Any]) -> dict[str, Any]:
        self.counts[verdict.result] += 1
        if self.metrics:
            self.metrics.verified(verdict.result)
        return {**verdict.as_record(), **about}


def ask(socket_path: str, recipient: str, sender: str = "", timeout: float = ASK_SECONDS) -> Verdict:
    """The verdict of the daemon at `socket_path` on `recipient`: what a Python front door calls
    (blocking: it waits for the socket). StatusError when the daemon cannot be asked or does not
    answer; VerifyError when it refuses the request."""
    answer = query(socket_path, {"command": "verify", "recipient": recipient, "sender": sender}, timeout)
    if "error" in answer:
        raise VerifyError(str(answer["error"]))
    try:
        return Verdict(answer["verdict"], answer["dsn"], answer["text"])
    except (KeyError, TypeError):
        raise StatusError(f"unreadable answer from the daemon at {socket_path}") from None
