"""The daemon's side of recipient verification: the `verify` request of the status socket.

    {"command": "verify", "recipient": "user@example.org", "sender": "a@example.net"}
    -> {"verdict": "refused", "code": 550, "dsn": "5.1.1", "text": "...", "recipient": ...}

The verdict is the one delivery would reach (policy/verify.py), by the policy in force. A verdict
of the policy alone (an alias, a rule, a next hop) is answered at once from the supervisor's loop,
in microseconds. MX routing needs DNS, and the supervisor's loop never waits for DNS: the question
goes to a network worker, whose lookup threads ask as delivery asks (same resolver, same cache of
answers for their TTL), and the client gets its answer when the worker's reply comes back (a
`Later` of the status socket). Clients asking about the same domain meanwhile share one question.
A client whose answer has not come by its deadline on the socket hears a temporary verdict
(4.4.3), never nothing. Nothing is queued, and nothing is logged per request: the front door
logs its refusals, and the daemon counts verdicts (`status`, metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from policy.routing import Policy
from policy.verify import RESULTS, TEMPORARY, Verdict, from_dns, judge
from router.address import AddressError, parse_path
from router.status_socket import Later, StatusError, StatusServer, query

if TYPE_CHECKING:
    from router.metrics import Metrics

ASK_SECONDS = 10.0  # a front door's wait for a verdict; the daemon answers within its socket's deadline
MAX_ADDRESS = 1000  # characters of a request's address looked at: a valid one has at most 256 octets


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
    """Answers `verify` requests and counts their verdicts. `ask_dns(domain)` hands a domain to a
    network worker and says whether one took it; its answer comes to `answered`."""

    def __init__(self, server: StatusServer, ask_dns: Callable[[str], bool], metrics: Metrics | None = None) -> None:
        self.server = server
        self.ask_dns = ask_dns
        self.metrics = metrics
        self.counts = dict.fromkeys(RESULTS, 0)

    def answer(self, request: dict[str, Any], policy: Policy) -> dict[str, Any] | Later:
        try:
            recipient = address_of(request, "recipient")
            address_of(request, "sender", null_ok=True)  # checked; no verdict depends on it
        except VerifyError as exc:
            return {"error": str(exc)}
        route = policy.route_queued(recipient, rewritten=False)
        about = {"recipient": recipient, "route": route.reason}
        verdict = judge(route)
        if verdict is not None:
            return self._counted(verdict, about)
        domain = route.next_hop.argument  # MX routing to this domain
        key = f"domain:{domain}"
        if not self.server.awaited(key) and not self.ask_dns(domain):
            return self._counted(Verdict(TEMPORARY, "4.3.0", "no worker to ask DNS now"), about)

        def finish(failure: Any) -> dict[str, Any]:
            if failure is None:
                return self._counted(Verdict(TEMPORARY, "4.4.3", f"no DNS answer for {domain} in time"), about)
            return self._counted(from_dns(domain, tuple(failure) if failure else None), about)

        return Later(key, finish)

    def answered(self, domain: str, failure: list[str] | None) -> None:
        """A worker's answer about `domain`: None when it has hosts to try, else [code, text]."""
        self.server.settle(f"domain:{domain}", failure or [])

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
