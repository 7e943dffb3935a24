"""The routing decision: which next hop a recipient goes to, decided afresh at every attempt.

Precedence: `relayhost` over everything, then the transport map (first matching rule), then
`default-transport`, then DNS MX routing. Nothing about a route is stored in the queue file, so
a policy fixed and reloaded reaches mail already waiting in deferred/.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import pwd
from dataclasses import dataclass
from typing import Protocol

from policy.aliases import Alias, Aliases, load_aliases
from policy.command_line import split_local
from policy.destinations import DestinationRules, load_destinations
from policy.next_hop import ERROR, MDA, PIPE, NextHop, mx_route
from policy.policy_file import Problems
from policy.rewriting import FROM, TO, Rewriter, RewritingError, load_rewriting
from policy.transport_map import PolicyError, Rule, TransportMap, load_definitions, load_transport_map
from router.spool.address import split_address
from router.spool.queue_file import QueueFile


class PolicySettings(Protocol):
    """The keys of the daemon's configuration (router/config/) that name the policy: the
    configuration is a layer above the policy, so the policy says what it reads, not where from."""

    transport_defs: str
    transports: str
    default_transport: NextHop | None
    relayhost: NextHop | None
    aliases: str
    destinations: str
    rewriting: str
    rewrite_both: bool
    pipe_user: str
    user: str


@dataclass(frozen=True)
class Route:
    next_hop: NextHop
    reason: str  # why this next hop, in words an administrator can act on
    rule: Rule | None = None
    alias: Alias | None = None


class Policy:
    def __init__(self, default_transport: NextHop | None, relayhost: NextHop | None = None,
                 transport_map: TransportMap | None = None, aliases: Aliases | None = None,
                 rewriter: Rewriter | None = None, rewrite_headers: bool = False, pipe_user: str = "nobody",
                 destinations: DestinationRules | None = None):
        self.default_transport = default_transport
        self.relayhost = relayhost
        self.transport_map = transport_map
        self.aliases = aliases
        self.rewriter = rewriter or Rewriter()
        self.rewrite_headers = rewrite_headers
        self.pipe_user = pipe_user  # who a pipe without user= runs as
        self.destinations = destinations or DestinationRules()  # settings per destination (defaults: no file)
        self.drain: NextHop | None = None  # the peer every recipient goes to while this node drains

    def draining_to(self, peer: NextHop) -> Policy:
        """This policy with every recipient routed to `peer`, as a relayhost would be: the node
        hands its whole queue to another (`qrouter drain`, router/spool/drain.py), by the usual
        delivery (journal, 250 per recipient, backoff) with its envelope and DSN parameters."""
        drained = copy.copy(self)
        drained.__dict__.pop("kinds", None)  # worked out again, for the peer
        drained.relayhost = drained.drain = peer
        return drained

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

    @functools.cached_property
    def kinds(self) -> frozenset[str]:
        """The kinds of every next hop the policy sends mail to (the relayhost, or
        default-transport and the transport rules); worked out once, as the policy never changes
        (a reload makes a new one)."""
        if self.relayhost is not None:
            return frozenset({self.relayhost.kind})
        hops = [self.default_transport, *(rule.next_hop for rule in
                                          (self.transport_map.rules if self.transport_map else []))]
        return frozenset(hop.kind for hop in hops if hop is not None)

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

    def route_queued(self, address: str, rewritten: bool) -> Route:
        """The route of a queued recipient: as route(), after the rewriting rules unless its
        message was rewritten already (which happens once, at the first attempt)."""
        return self.route(address if rewritten else self.rewriter.rewrite(TO, address)[0])

    def route(self, recipient: str) -> Route:
        found = self._next_hop(recipient)
        if found.next_hop.kind == PIPE and not found.next_hop.user:
            return dataclasses.replace(found, next_hop=dataclasses.replace(found.next_hop, user=self.pipe_user))
        if found.next_hop.kind != MDA:
            return found
        local = split_address(recipient)[0]
        alias = self.aliases.lookup(local) or self.aliases.lookup(split_local(local)[0]) if self.aliases else None
        if alias is None:
            refusal = NextHop(ERROR, f"5.1.1 no alias for local part {local!r} in {self.aliases.path}"
                              if self.aliases else "5.1.1 no aliases file for local delivery")
            return Route(refusal, f"{found.reason}, but no alias", found.rule)
        hop = dataclasses.replace(found.next_hop, user=alias.user)
        return Route(hop, f"{found.reason}, alias {alias.where} ({alias.virtual} -> {alias.user})",
                     found.rule, alias)

    def _next_hop(self, recipient: str) -> Route:
        if self.relayhost is not None:
            return Route(self.relayhost, "draining to a peer" if self.drain else "relayhost")
        if self.transport_map is not None:
            rule = self.transport_map.lookup(recipient)
            if rule is not None:
                return Route(rule.next_hop, f"transports rule {rule.where} ({rule.destination})", rule)
        if self.default_transport is not None:
            return Route(self.default_transport, "default-transport")
        return Route(mx_route(split_address(recipient)[1]), "no rule matched: MX routing")


def load_policy(config: PolicySettings, runs_as: str | None = None) -> Policy:
    """Read every policy file the config names; PolicyError (FILE:LINE: ...) naming every problem
    in all of them, a line each.

    Done once in the supervisor, at start and on reload, and inherited by the workers it forks,
    so every worker routes by exactly the files that were checked. `runs_as` is the only user a
    pipe or local agent can run as, when the daemon cannot switch users (not started as root);
    a rule that needs another is an error of its line.
    """
    problems = Problems(PolicyError)
    definitions: dict[str, str] = {}
    if config.transport_defs:
        with problems.collecting():
            definitions = load_definitions(config.transport_defs)
        if not config.transports:
            problems.found.append(f"{config.transport_defs}: transport-defs is set but transports is not")
    transport_map = aliases = destinations = rewriter = None
    if config.transports:
        with problems.collecting():
            transport_map = load_transport_map(config.transports, definitions, config.transport_defs)
    rules = [("default-transport", config.default_transport),
             *((rule.where, rule.next_hop) for rule in (transport_map.rules if transport_map else []))]
    local = next((hop for _, hop in rules if hop is not None and hop.kind == MDA), None)
    if local is not None and config.relayhost is None and not config.aliases:
        problems.found.append(f"local delivery ({local}) needs an aliases file: set the aliases key")
    if config.aliases:
        with problems.collecting():
            aliases = load_aliases(config.aliases, local_delivery=local is not None)
    if config.destinations:
        with problems.collecting():
            destinations = load_destinations(config.destinations)
    if config.rewriting:
        try:
            rewriter = load_rewriting(config.rewriting)
        except RewritingError as exc:
            problems.found.append(str(exc))
    pipe_user = runs_as or config.pipe_user
    for where, hop in rules:
        if hop is not None and hop.kind == PIPE:
            with problems.collecting():
                _check_program_user(where, hop.user or pipe_user, config, runs_as, "pipe")
    if local is not None and aliases is not None:
        for alias in aliases.entries:
            with problems.collecting():
                _check_program_user(alias.where, alias.user, config, runs_as, "local delivery", own_user_ok=True)
    problems.check()
    return Policy(config.default_transport, config.relayhost, transport_map, aliases, rewriter, config.rewrite_both,
                  pipe_user, destinations)


def _check_program_user(where: str, user: str, config: PolicySettings, runs_as: str | None, what: str,
                        own_user_ok: bool = False) -> None:
    """A pipe or local agent runs as `user`: it must exist and not be root; a pipe never runs
    as the daemon's own unprivileged user (whose files are the spool), a local agent only when an
    alias names it; and without the right to switch users, only the daemon's own user can be had."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except (KeyError, ValueError):
        raise PolicyError(f"{where}: {what} would run as {user!r}: no such unix user") from None
    if uid == 0:
        raise PolicyError(f"{where}: {what} never runs as root")
    if runs_as is not None and user != runs_as:
        raise PolicyError(f"{where}: {what} would run as {user!r}, but qrouter runs as {runs_as!r} without the "
                          f"right to switch users: start it as root (it then runs as its user {config.user!r}, "
                          f"keeping only that right for local delivery), or use {runs_as!r}")
    if runs_as is None and user == config.user and not own_user_ok:
        raise PolicyError(f"{where}: {what} never runs as qrouter's own user {user!r} (the spool's owner): "
                          "choose another with user=NAME or pipe-user")
