"""The routing decision: which next hop a recipient goes to, decided afresh at every attempt.

Precedence: `relayhost` over everything, then (later) the transport map and aliases, then
`default-transport`, then DNS MX routing. Nothing about a route is stored in the queue file, so a
policy fixed and reloaded reaches mail already waiting in deferred/.
"""

from __future__ import annotations

from dataclasses import dataclass

from policy.next_hop import NextHop, mx_route
from router.address import split_address


@dataclass(frozen=True)
class Route:
    next_hop: NextHop
    reason: str


class Policy:
    def __init__(self, default_transport: NextHop | None, relayhost: NextHop | None = None):
        self.default_transport = default_transport
        self.relayhost = relayhost

    def route(self, recipient: str) -> Route:
        if self.relayhost is not None:
            return Route(self.relayhost, "relayhost")
        if self.default_transport is not None:
            return Route(self.default_transport, "default-transport")
        return Route(mx_route(split_address(recipient)[1]), "no rule matched")
