"""What MX routing hands the SMTP transport (MXHost), how it fails (MXLookupError,
ResolverConfigError), and what it parses (the `dns-servers` setting, address literals).

None of it needs the DNS library, which takes about a tenth of a second to load; so the
configuration, which every command and front door loads, never loads it, and the transport
loads workers.mx_lookup only once a name has to be looked up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from policy.next_hop import SITE

DNS_PORT = 53


class ResolverConfigError(ValueError):
    """`dns-servers` or the timeout cannot be used; the message names the item and says why.

    Messages say "must" so that the config loader shows them as they are.
    """


def parse_dns_servers(text: str) -> list[tuple[str, int]]:
    """Split `dns-servers` ("127.0.0.1:5353,[::1]:5353", port 53 when left out) into
    (address, port) pairs; a name server must be an address since no DNS is there to find it."""
    servers = []
    for raw in text.split(","):
        item = raw.strip()
        port: str | None = None
        if item.startswith("["):
            host, closed, rest = item[1:].partition("]")
            if not closed or (rest and not rest.startswith(":")):
                raise ResolverConfigError(f"dns-servers item {item!r} must be [IPv6] or [IPv6]:PORT")
            port = rest[1:] if rest else None
        elif item.count(":") == 1:
            host, port = item.split(":")
        else:
            host = item  # IPv4 alone, or a bare IPv6 address whose colons are not a port separator
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ResolverConfigError(f"dns-servers item {item!r}: {host!r} must be an IPv4 or IPv6 address "
                                      "(write ADDRESS, ADDRESS:PORT or [IPv6]:PORT)") from None
        if item.startswith("[") and address.version != 6:
            raise ResolverConfigError(f"dns-servers item {item!r}: brackets must hold an IPv6 address")
        servers.append((str(address), _port(port, item)))
    return servers


def _port(text: str | None, item: str) -> int:
    if text is None:
        return DNS_PORT
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ResolverConfigError(f"dns-servers item {item!r}: port {text!r} must be a number from 1 to 65535")
    return int(text)


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
    addresses), the condition for DANE (RFC 7672 2.2.1)."""

    name: str
    preference: int
    addresses: tuple[str, ...]
    secure: bool = False


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
