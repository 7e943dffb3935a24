"""The routing decision: which next hop a recipient goes to, decided afresh at every attempt.

Only `default-transport` exists so far; the transport map, aliases and `relayhost` slot in here,
in front of it. Nothing about a route is stored in the queue file, so a policy fixed and
reloaded reaches mail already waiting in deferred/.
"""

from __future__ import annotations

from dataclasses import dataclass

from policy.next_hop import MX_ROUTING, NextHop


@dataclass(frozen=True)
class Route:
    next_hop: NextHop
    reason: str


class Policy:
    def __init__(self, default_transport: NextHop | None):
        self.default_transport = default_transport

    def route(self, recipient: str) -> Route:
        if self.default_transport is not None:
            return Route(self.default_transport, "default-transport")
        return Route(MX_ROUTING, "no rule matched")
