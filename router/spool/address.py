"""RFC 5321 paths: the one place that decides whether an envelope address is acceptable.

Every front door (the Python API, `qrouter enqueue`, `qrouter-sendmail`, the aiosmtpd
QueueHandler; the qpsmtpd plugin has a copy of these rules in Perl) calls `parse_path`, so a queue
file never holds an address a next hop could misread: no CR, LF or NUL, no unbalanced quotes,
nothing longer than RFC 5321 allows. UTF-8 is accepted (RFC 6531).
"""

from __future__ import annotations

import ipaddress
import re

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# atext of RFC 5322 (the inside of a [...] class), which RFC 6531 widens to any non-ASCII
# character: NON_ASCII, an alternative of its own, since a class that spans the whole of Unicode
# takes milliseconds to compile and every `qrouter` command would pay them at start.
ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
NON_ASCII = r"[^\x00-\x7f]"
_ATOM = rf"(?:[{ATEXT}]|{NON_ASCII})+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_QUOTED_STRING = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|{NON_ASCII}|\\[\x20-\x7e])*"')
_LET_DIG = rf"(?:[A-Za-z0-9]|{NON_ASCII})"
_LABEL = re.compile(rf"{_LET_DIG}(?:(?:[A-Za-z0-9\-]|{NON_ASCII})*{_LET_DIG})?")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9\-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
_SOURCE_ROUTE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")


class AddressError(ValueError):
    """An address that is not a valid RFC 5321 path; the message says what is wrong."""


def parse_path(text: str, *, null_ok: bool = False) -> str:
    """Return the mailbox of a path given with or without angle brackets.

    `null_ok` admits the null reverse-path `<>` (returned as ""), valid only as a sender.
    A source route (`<@a,@b:user@c>`) is accepted and dropped, as RFC 5321 section C asks.
    """
    if has_cr_lf_nul(text):
        raise AddressError(f"address {text!r} contains CR, LF or NUL")
    try:
        text.encode()
    except UnicodeEncodeError:  # e.g. a command-line argument that was not UTF-8
        raise AddressError(f"address {text!r} is not valid UTF-8") from None
    inner = text
    if text.startswith("<") or text.endswith(">"):
        if not (text.startswith("<") and text.endswith(">")):
            raise AddressError(f"address {text!r} has unbalanced angle brackets")
        inner = text[1:-1]
    if inner == "":
        if null_ok:
            return ""
        raise AddressError("the null address <> is only valid as a sender")
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end():]
    check_mailbox(inner)
    return inner


def has_cr_lf_nul(text: str) -> bool:
    """Whether `text` holds CR, LF or NUL: where a queue file line or an SMTP command would end,
    so no front door may pass such text on, an address or any other value."""
    return "\r" in text or "\n" in text or "\0" in text


def check_mailbox(mailbox: str) -> None:
    """Raise AddressError unless `mailbox` is `local-part@domain` as RFC 5321 defines it."""
    if len(mailbox.encode()) > MAX_PATH - 2:
        raise AddressError(f"address {mailbox!r} is longer than {MAX_PATH - 2} octets")
    at = mailbox.rfind("@")
    if at <= 0:
        raise AddressError(f"address {mailbox!r} has no local part and domain (user@domain)")
    local, domain = mailbox[:at], mailbox[at + 1:]
    if len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError(f"local part of {mailbox!r} is longer than {MAX_LOCAL_PART} octets")
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        raise AddressError(f"local part of {mailbox!r} is not a valid dot-string or quoted string")
    check_domain(domain, mailbox)


def check_domain(domain: str, context: str) -> None:
    """Raise AddressError unless `domain` is a host name or an address literal."""
    if not domain:
        raise AddressError(f"address {context!r} has an empty domain")
    if len(domain.encode()) > MAX_DOMAIN:
        raise AddressError(f"domain of {context!r} is longer than {MAX_DOMAIN} octets")
    if domain.startswith("["):
        if not domain.endswith("]") or not _address_literal_ok(domain[1:-1]):
            raise AddressError(f"domain of {context!r} is not a valid address literal")
        return
    labels = domain.split(".")
    if not all(len(label) <= 63 and _LABEL.fullmatch(label) for label in labels):
        raise AddressError(f"domain of {context!r} is not a valid host name")


def _address_literal_ok(literal: str) -> bool:
    if literal.lower().startswith("ipv6:"):
        if "%" in literal:  # ipaddress accepts a zone ("%eth0"), RFC 5321 has none
            return False
        try:
            ipaddress.IPv6Address(literal[5:])
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(literal)
    except ValueError:
        return bool(_GENERAL_LITERAL.fullmatch(literal))
    return True


def split_address(mailbox: str) -> tuple[str, str]:
    """Local part and domain of a mailbox already checked by `parse_path`."""
    local, _, domain = mailbox.rpartition("@")
    return local, domain
