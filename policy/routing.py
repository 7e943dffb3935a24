"""The routing decision: which next hop a recipient goes to, decided afresh at every attempt.

Precedence: `relayhost` over everything, then the transport map (first matching rule), then
`default-transport`, then DNS MX routing. Nothing about a route is stored in the queue file, so
a policy fixed and reloaded reaches mail already waiting in deferred/.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from policy.aliases import Alias, Aliases, load_aliases
from policy.next_hop import ERROR, MDA, NextHop, mx_route
from policy.rewriting import FROM, TO, Rewriter, RewritingError, load_rewriting
from policy.transport_map import PolicyError, Rule, TransportMap, load_definitions, load_transport_map
from router.address import split_address
from router.config import Config
from router.queue_file import QueueFile


@dataclass(frozen=True)
class Route:
    next_hop: NextHop
    reason: str  # why this next hop, in words an administrator can act on
    rule: Rule | None = None
    alias: Alias | None = None


class Policy:
    def __init__(self, default_transport: NextHop | None, relayhost: NextHop | None = None,
                 transport_map: TransportMap | None = None, aliases: Aliases | None = None,
                 rewriter: Rewriter | None = None, rewrite_headers: bool = False):
        self.default_transport = default_transport
        self.relayhost = relayhost
        self.transport_map = transport_map
        self.aliases = aliases
        self.rewriter = rewriter or Rewriter()
        self.rewrite_headers = rewrite_headers

    def rewrite(self, queue_file: QueueFile) -> list[str]:
        """Apply the rewriting rules to a new message: envelope sender (from rules), recipients
        (to rules) and, with rewrite-both, the From:/To:/Cc: headers. Returns what changed, for
        the log; the caller records that it was done so it never happens twice."""
        changes = []
        sender, rule = self.rewriter.rewrite(FROM, queue_file.sender)
        if rule is not None:
            changes.append(f"from=<{queue_file.sender}> rewritten to <{sender}> by {rule.where}")
            queue_file.sender = sender
        for rcpt in queue_file.recipients:
            address, rule = self.rewriter.rewrite(TO, rcpt.address)
            if rule is not None:
                changes.append(f"to=<{rcpt.address}> rewritten to <{address}> by {rule.where}")
                rcpt.address = address
        if self.rewrite_headers:
            message = self.rewriter.rewrite_headers(queue_file.message)
            if message != queue_file.message:
                changes.append("From:/To:/Cc: header addresses rewritten")
                queue_file.message = message
        return changes

    @property
    def only_next_hop(self) -> NextHop | None:
        """The next hop of every recipient whatever its address, if the policy has just one (a
        relayhost, or a default-transport with no transports file that is no local agent): the
        scheduler then needs to read no message to know its destination."""
        if self.relayhost is not None:
            return self.relayhost
        if self.transport_map is None and self.default_transport is not None and self.default_transport.kind != MDA:
            return self.default_transport
        return None

    def route(self, recipient: str) -> Route:
        found = self._next_hop(recipient)
        if found.next_hop.kind != MDA:
            return found
        local = split_address(recipient)[0]
        alias = self.aliases.lookup(local) if self.aliases else None
        if alias is None:
            refusal = NextHop(ERROR, f"5.1.1 no alias for local part {local!r} in {self.aliases.path}"
                              if self.aliases else "5.1.1 no aliases file for local delivery")
            return Route(refusal, f"{found.reason}, but no alias", found.rule)
        hop = dataclasses.replace(found.next_hop, user=alias.user)
        return Route(hop, f"{found.reason}, alias {alias.where} ({alias.virtual} -> {alias.user})",
                     found.rule, alias)

    def _next_hop(self, recipient: str) -> Route:
        if self.relayhost is not None:
            return Route(self.relayhost, "relayhost")
        if self.transport_map is not None:
            rule = self.transport_map.lookup(recipient)
            if rule is not None:
                return Route(rule.next_hop, f"transports rule {rule.where} ({rule.destination})", rule)
        if self.default_transport is not None:
            return Route(self.default_transport, "default-transport")
        return Route(mx_route(split_address(recipient)[1]), "no rule matched: MX routing")


def load_policy(config: Config) -> Policy:
    """Read every policy file the config names; PolicyError (FILE:LINE: ...) on the first problem.

    Done once in the supervisor, at start and on reload, and inherited by the workers it forks,
    so every worker routes by exactly the files that were checked.
    """
    definitions = load_definitions(config.transport_defs) if config.transport_defs else {}
    if config.transport_defs and not config.transports:
        raise PolicyError(f"{config.transport_defs}: transport-defs is set but transports is not")
    transport_map = (load_transport_map(config.transports, definitions, config.transport_defs)
                     if config.transports else None)
    hops = [config.default_transport, *(rule.next_hop for rule in (transport_map.rules if transport_map else []))]
    local = next((hop for hop in hops if hop is not None and hop.kind == MDA), None)
    if local is not None and config.relayhost is None and not config.aliases:
        raise PolicyError(f"local delivery ({local}) needs an aliases file: set the aliases key")
    aliases = load_aliases(config.aliases, local_delivery=local is not None) if config.aliases else None
    try:
        rewriter = load_rewriting(config.rewriting) if config.rewriting else None
    except RewritingError as exc:
        raise PolicyError(str(exc)) from None
    return Policy(config.default_transport, config.relayhost, transport_map, aliases, rewriter, config.rewrite_both)
