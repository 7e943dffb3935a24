"""Recipient verification: what would happen to a recipient, said before any mail is queued.

A front door asks at RCPT (the qpsmtpd plugin, the aiosmtpd handler, `qrouter verify`), so that
a recipient qrouter would bounce is refused there and no report ever goes to a forged sender.
The answer comes from the route delivery would take (Policy.route_queued: the rewriting rules,
the transports file, the aliases, the next hop), judged here:

    deliverable   every next hop that takes the mail (SMTP, LMTP, Maildir, pipe, local agent
                  with an alias, discard)                                            250 2.1.5
    refused       queue/error (its code and text), local delivery without an alias (5.1.1),
                  and from DNS: no such domain (5.1.2), null MX (5.1.10)                550
    temporary     queue/retry (its code and text), DNS that cannot answer now (4.4.3)   450

MX routing needs DNS to tell: `judge` says so by returning None, and the caller asks DNS as
delivery does (workers/mx_lookup.py) and hands the failure, if any, to `from_dns`. A destination
with `callout=yes` in the destinations file is asked itself (`needs_callout`): its reply to RCPT
(or the failure to get one) becomes the verdict by its status code (`from_status`). Nothing here
asks DNS or a next hop itself: the policy knows no processes nor network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from policy.next_hop import ERROR, LMTP, MX, RETRY, SMTP
from policy.routing import Policy, Route

DELIVERABLE, REFUSED, TEMPORARY = "deliverable", "refused", "temporary"
RESULTS = (DELIVERABLE, REFUSED, TEMPORARY)
CODES = {DELIVERABLE: 250, REFUSED: 550, TEMPORARY: 450}


@dataclass(frozen=True)
class Verdict:
    result: str  # deliverable, refused or temporary
    dsn: str  # enhanced status code: 2.1.5, 5.1.1, 4.4.3...
    text: str  # why, in the words delivery would use

    @property
    def code(self) -> int:
        """The SMTP reply code a front door answers RCPT with."""
        return CODES[self.result]

    def reply(self) -> str:
        """The whole SMTP reply line (without CRLF): `550 5.1.1 no alias for ...`."""
        return f"{self.code} {self.dsn} {self.text}"

    def as_record(self) -> dict[str, Any]:
        return {"verdict": self.result, "code": self.code, "dsn": self.dsn, "text": self.text}


def judge(route: Route) -> Verdict | None:
    """The verdict the route alone gives; None for MX routing, where DNS must say."""
    hop = route.next_hop
    if hop.kind == MX:
        return None
    if hop.kind in (ERROR, RETRY):
        dsn, text = hop.verdict()
        return Verdict(REFUSED if hop.kind == ERROR else TEMPORARY, dsn, text)
    return Verdict(DELIVERABLE, "2.1.5", f"deliverable: {route.reason}")


def needs_callout(route: Route, policy: Policy) -> bool:
    """Whether the next hop itself is asked: an SMTP or LMTP next hop, or MX routing, whose
    destination has `callout=yes` in the destinations file."""
    hop = route.next_hop
    return hop.kind in (SMTP, LMTP, MX) and policy.destinations.for_destination(hop.destination).callout


def from_dns(domain: str, failure: tuple[str, str] | None) -> Verdict:
    """The verdict for MX routing to `domain`, from what its lookup found: None when there are
    hosts to deliver to, else (status code, message) of the failure (workers.mx_hosts.MXLookupError)."""
    if failure is None:
        return Verdict(DELIVERABLE, "2.1.5", f"deliverable: MX routing for {domain}")
    return from_status(*failure)


def from_status(dsn: str, text: str) -> Verdict:
    """The verdict an enhanced status code gives: 2.X.X deliverable, 5.X.X refused, else temporary."""
    result = DELIVERABLE if dsn.startswith("2") else REFUSED if dsn.startswith("5") else TEMPORARY
    return Verdict(result, dsn, text)
