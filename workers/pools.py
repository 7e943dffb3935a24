"""The two kinds of worker, and which next hops each delivers to.

Local workers run programs as other users (pipes, local delivery agents) and keep the right to
switch users for that; network workers deliver everything else (SMTP, LMTP, MX, Maildir, the
queue transports) and have no privilege at all (router/config/privileges.py). A message whose pending
recipients need both is split by the first worker that gets it (workers/delivery.py), so each
part goes to the kind of worker that can deliver it.
"""

from __future__ import annotations

from collections.abc import Iterable

from policy.next_hop import MDA, PIPE, NextHop

NETWORK, LOCAL = "network", "local"
POOLS = (NETWORK, LOCAL)
_LOCAL_KINDS = frozenset({MDA, PIPE})


def pool_of(kind: str) -> str:
    """The kind of worker that delivers to next hops of this kind."""
    return LOCAL if kind in _LOCAL_KINDS else NETWORK


def pool_for(hops: Iterable[NextHop]) -> str:
    """The kind of worker a message goes to: local only when all its next hops are local ones
    (the network worker splits off the rest of a mixed message)."""
    kinds = {hop.kind for hop in hops}
    return LOCAL if kinds and kinds <= _LOCAL_KINDS else NETWORK
