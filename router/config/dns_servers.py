"""The `dns-servers` setting: the name servers MX routing asks, as address and port pairs.

The configuration checks it when it loads; workers/mx_lookup.py builds its resolver from it.
"""

from __future__ import annotations

import ipaddress

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
