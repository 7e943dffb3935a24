"""TLS security levels for outbound SMTP, as Postfix's TLS_README defines them, and the keys of
the destinations file that set them per destination (`tls=`, `match=`, `fingerprint=`,
`protocols=`).

    none         no TLS, even when the server offers it
    may          STARTTLS when offered, the certificate unchecked; plain text when the server does
                 not offer it or the handshake fails (the only level that falls back)
    encrypt      TLS required; the certificate verified, its chain and the MX or relay host name
                 (qrouter's `encrypt` always did, unlike Postfix's, and a setting that silently
                 stopped checking would weaken every configuration that relies on it)
    verify       TLS required; a chain to the CA file and a name matching the MX host (or relay
                 host) name or the next-hop domain; `match=` replaces those names
    secure       as verify, but the names come from the policy, never from DNS: `match=`, by
                 default the next-hop domain and its subdomains
    fingerprint  TLS required; the certificate's or its public key's SHA-256 digest is one listed
                 in `fingerprint=`; no CA or name check
    dane         DANE (RFC 7672) where DNSSEC proves the MX host and its TLSA records: TLS
                 required and the certificate matched against them; TLS required and the
                 certificate unchecked where every validated record is unusable; `may` for a
                 host without records (policy/dane.py works out each host's policy)
    dane-only    DANE or nothing: a host without validated, usable TLSA records is not used

Every level above `may` defers (4.7.x, with the reason) when the server withholds STARTTLS, the
handshake fails or the certificate does not pass: no part of a message is sent in clear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policy.dane import TLSARecord

TLS_NONE, TLS_MAY, TLS_ENCRYPT = "none", "may", "encrypt"
TLS_VERIFY, TLS_SECURE, TLS_FINGERPRINT = "verify", "secure", "fingerprint"
TLS_DANE, TLS_DANE_ONLY = "dane", "dane-only"
LEVELS = (TLS_NONE, TLS_MAY, TLS_ENCRYPT, TLS_VERIFY, TLS_SECURE, TLS_FINGERPRINT, TLS_DANE, TLS_DANE_ONLY)
GLOBAL_LEVELS = (TLS_NONE, TLS_MAY, TLS_ENCRYPT, TLS_VERIFY, TLS_SECURE,  # fingerprint needs digests of its own
                 TLS_DANE, TLS_DANE_ONLY)
DANE_LEVELS = (TLS_DANE, TLS_DANE_ONLY)
NAMED_LEVELS = (TLS_ENCRYPT, TLS_VERIFY, TLS_SECURE)  # those that check the certificate's names
PROTOCOLS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")  # as ssl.SSLSocket.version() names them
_DIGEST = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"\.?[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


@dataclass(frozen=True)
class TLSPolicy:
    """What a connection's TLS must be. `match`: the names a certificate may carry (`.domain`
    for any name under it), empty for the level's own; `fingerprints`: SHA-256 digests in lower
    case hex; `min_protocol`: the oldest protocol version accepted, "" for the library's.

    Under a DANE level, one host's policy (policy/dane.py): `tlsa`, the usable TLSA records the
    certificate must match; `tlsa_unusable`, the validated records of a host none of whose
    records is usable, which still make TLS required but leave the certificate unchecked (RFC
    7672 2.2); `tlsa_base`, the name those records are at (the host's, or the end of its
    validated CNAME chain, RFC 7672 2.2.2), which SNI names (RFC 7672 8.1); `refusal`, why no
    session may be opened to the host at all (what DNSSEC did not prove), "" when one may, and
    `refusal_type` what a TLS report calls it."""

    level: str = TLS_MAY
    match: tuple[str, ...] = ()
    fingerprints: tuple[str, ...] = ()
    min_protocol: str = ""
    tlsa: tuple[TLSARecord, ...] = ()
    tlsa_unusable: tuple[TLSARecord, ...] = ()
    tlsa_base: str = ""
    refusal: str = ""
    refusal_type: str = ""

    @property
    def required(self) -> bool:
        """Whether the message may only go encrypted: every level but none and may."""
        return self.level not in (TLS_NONE, TLS_MAY)

    @property
    def authenticated(self) -> bool:
        """Whether a session's certificate is checked: under every required level, but for a
        DANE host whose TLSA records are all unusable (TLS without authentication, as Postfix's
        own `encrypt`)."""
        return self.required and not self.tlsa_unusable

    @property
    def published(self) -> tuple[TLSARecord, ...]:
        """The TLSA records DNSSEC proved for the host: the usable ones, else the unusable."""
        return self.tlsa or self.tlsa_unusable


def parse_level(text: str, levels: tuple[str, ...] = LEVELS) -> str:
    if text not in levels:
        raise ValueError(f"must be one of {', '.join(levels)}")
    return text


def parse_match(text: str) -> tuple[str, ...]:
    """Postfix's `match=name:.domain:...`: names joined by colons, `.domain` for any name under it."""
    names = tuple(name.lower() for name in text.split(":"))
    for name in names:
        if not _NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a host name or .domain (write names joined by colons)")
    return names


def parse_fingerprints(text: str) -> tuple[str, ...]:
    """SHA-256 digests joined by `|` or commas, each 64 hex digits with or without colons
    between the bytes (as `openssl x509 -fingerprint -sha256` writes them)."""
    items = re.split(r"[|,]", text)
    for item in items:
        if not _DIGEST.fullmatch(item.replace(":", "").lower()):
            raise ValueError(f"{item!r} is not a SHA-256 digest (64 hex digits, colons between bytes allowed)")
    return tuple(item.replace(":", "").lower() for item in items)


def parse_protocols(text: str) -> str:
    """`>=TLSv1.2`: the oldest protocol version a session may use (Postfix 3.6's form)."""
    version = text[2:] if text.startswith(">=") else ""
    if version not in PROTOCOLS:
        raise ValueError(f"must be >=VERSION with VERSION one of {', '.join(PROTOCOLS)} (e.g. >=TLSv1.2)")
    return version


def show_protocols(version: str) -> str:
    return f">={version}"


def check_combination(level: str | None, match: object, fingerprints: object, protocols: object) -> None:
    """The keys beside `tls=` that its level needs or takes; ValueError says which is wrong."""
    if match is not None and level not in (TLS_VERIFY, TLS_SECURE):
        raise ValueError("match= is for tls=verify and tls=secure")
    if (fingerprints is not None) != (level == TLS_FINGERPRINT):
        raise ValueError("tls=fingerprint needs fingerprint=, and fingerprint= needs tls=fingerprint")
    if protocols is not None and level in (None, TLS_NONE):
        raise ValueError("protocols= needs a tls= level on the same line, other than none")


def names_to_match(policy: TLSPolicy, host: str, next_hop: str) -> tuple[str, ...]:
    """The names a certificate may match to pass: `match=` where the policy gives it; else, under
    secure, the next-hop domain and any name under it (nothing DNS said); under verify and DANE
    (whose DANE-TA records check names, RFC 7672 3.2.2), the host connected to (an MX or relay
    host) or the next-hop domain; under encrypt, the host."""
    if policy.match:
        return policy.match
    if policy.level == TLS_SECURE:
        return (next_hop, f".{next_hop}")
    if policy.level in (TLS_VERIFY, *DANE_LEVELS):
        return tuple(dict.fromkeys((host.lower(), next_hop.lower())))
    return (host.lower(),)
