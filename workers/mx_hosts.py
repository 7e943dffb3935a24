"""What MX routing hands the SMTP transport (MXHost), how it fails (MXLookupError), and the
address literals it parses (the `dns-servers` setting is the configuration's:
router/config/dns_servers.py).

None of it needs the DNS library, which takes about a tenth of a second to load: the transport
loads workers.mx_lookup only once a name has to be looked up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from policy.next_hop import SITE


class MXLookupError(Exception):
    """DNS gave no host to deliver to; `dsn` says whether to bounce or to try again later.

    `temporary` is read from the status code rather than stored beside it, so the two can
    never disagree.
    """

    def __init__(self, dsn: str, message: str):
        super().__init__(message)
        self.dsn = dsn
        self.message = message

    @property
    def temporary(self) -> bool:
        return self.dsn.startswith("4")


@dataclass(frozen=True)
class MXHost:
    """One host to try: `name` in lower-case A-labels without the final dot (the IP for an address literal),
    `addresses` IPv4 first, then IPv6, each family in the order DNS gave it; `secure` when a
    trusted validating resolver validated how it was found (its MX records, if any, and its
    addresses, or for an alias the first link of its CNAME chain), the condition for DANE (RFC
    7672 2.2.1, 2.2.2); `alias`, where the name's CNAME chain ends when DNSSEC validated all of
    it ("" otherwise), whose TLSA records count before the name's own (RFC 7672 2.2.2)."""

    name: str
    preference: int
    addresses: tuple[str, ...]
    secure: bool = False
    alias: str = ""


def site_destination(hosts: Iterable[str]) -> str:
    """The destination MX rollup counts a domain against: its MX host names, sorted, so every
    domain served by the same hosts (a provider's) shares one window and one connection limit."""
    return f"{SITE}:" + ",".join(sorted(set(hosts)))


def address_literal(text: str) -> str | None:
    """The IP address in `text` (an IPv4 or IPv6 address, or `IPv6:...`), or None if it is a name."""
    if text.lower().startswith("ipv6:"):
        text = text[5:]
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None
