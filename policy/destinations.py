"""The destinations file: settings per destination (connections at once, recipients per
transaction, a rate...), one rule a line, the first matching line winning.

    # pattern                          settings
    example.com                        concurrency=5 rate=10/min
    *.example.net                      recipients=20
    /.*\\.outlook\\.com/                 concurrency=10 initial-window=2
    mx1.example.org,mx2.example.org    messages-per-connection=100   # a site: its MX hosts
    smtp:[127.0.0.1]:2525              concurrency=50 mx-rollup=no   # a next hop

A pattern is written as in the transports file, and found with its index (policy/transport_map.py):
a domain, `*.domain` (any subdomain, not the domain itself) or `/regex/` (matched against the
whole domain, in lower case with IDNs in their xn-- form). Besides those, a site: the MX host
names of the domains that share them, joined by commas, in any order (a site of one host is
written as a domain, and the pattern matches the domain or the site of that name); and a next
hop, written as NextHop.destination writes it and `qrouter route` shows it (`smtp:[127.0.0.1]:2525`,
`lmtp:/run/dovecot/lmtp`, `mx:example.com`). Names compare case-insensitively.

A lookup gives the domain, the site and the next hop of a delivery; the first line in the file
that matches any of the three gives all of its settings. Keys it does not set have their
defaults (DestinationSettings), never the values of a later line that matches too.

Each setting is `key=value`; the keys are the fields of DestinationSettings, and a key is added
with one line there. The TLS keys (tls=, match=, fingerprint=, protocols=) are parsed and
checked together by policy/tls_policy.py, and looked up by for_tls. Lines and comments are read
as in every policy file (policy/policy_file.py).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from policy.next_hop import BUILTIN_QUEUE, LMTP, MDA, MX, PIPE, SITE, SMTP
from policy.policy_file import Problems, parse_boolean
from policy.tls_policy import (
    TLSPolicy,
    check_combination,
    parse_fingerprints,
    parse_level,
    parse_match,
    parse_protocols,
    show_protocols,
)
from policy.transport_map import (
    DOMAIN,
    PatternIndex,
    PolicyError,
    check_pattern,
    file_lines,
    normalize_domain,
    split_rule,
)

MAX_COUNT = 1_000_000  # connections, recipients, messages: more is a typo
_DIGITS = re.compile(r"[0-9]+")
_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)/(s|min|h)")
_SECONDS = {"s": 1, "min": 60, "h": 3600}
NEXT_HOP = "next hop"  # a kind of exact name in the index, beside DOMAIN and SITE
_HOP_KINDS = (SMTP, LMTP, MX, PIPE, MDA, *BUILTIN_QUEUE)  # and queue/NAME
CACHE_SIZE = 16384  # lookups remembered: every destination of a busy queue, a few hundred bytes each


def _count(text: str) -> int:
    """A whole number from 1 to MAX_COUNT in ASCII digits (int() would take "+5", "1_0", "٣")."""
    short = _DIGITS.fullmatch(text) and len(text.lstrip("0")) <= len(str(MAX_COUNT))  # int() refuses 4,300 digits
    if not short or not 1 <= int(text) <= MAX_COUNT:
        raise ValueError(f"must be a whole number from 1 to {MAX_COUNT}")
    return int(text)


def _rate(text: str) -> float:
    """Messages per second, from N/s, N/min or N/h."""
    match = _RATE.fullmatch(text)
    per_second = float(match[1]) / _SECONDS[match[2]] if match else 0.0
    if not 0 < per_second <= MAX_COUNT:
        raise ValueError(f"must be N/s, N/min or N/h with N a number above 0 (e.g. 10/min), at most {MAX_COUNT}/s")
    return per_second


def _show_rate(per_second: float) -> str:
    """A rate in the first unit that makes it at least 1: 10/min rather than 0.166667/s."""
    unit = next((unit for unit, seconds in _SECONDS.items() if per_second * seconds >= 1), "h")
    return f"{per_second * _SECONDS[unit]:.10g}/{unit}"


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _key(name: str, parse: Callable[[str], Any], default: Any, show: Callable[[Any], str] = str):
    return field(default=default, metadata={"key": name, "parse": parse, "show": show})


@dataclass(frozen=True)
class DestinationSettings:
    """What applies to deliveries to one destination. None: no limit of this file's (the config's
    destination-concurrency, the scheduler's first window, no cap on messages or rate)."""

    concurrency: int | None = _key("concurrency", _count, None)  # connections at once, all workers together
    initial_window: int | None = _key("initial-window", _count, None)  # connections before the first success
    recipients: int = _key("recipients", _count, 50)  # recipients per SMTP transaction (Postfix's default)
    messages_per_connection: int | None = _key("messages-per-connection", _count, None)
    rate: float | None = _key("rate", _rate, None, _show_rate)  # messages per second
    mx_rollup: bool = _key("mx-rollup", parse_boolean, True, _yes_no)  # domains sharing MX hosts share limits
    callout: bool | None = _key("callout", parse_boolean, None, _yes_no)  # recipient verification asks the next hop
    callout_rate: float | None = _key("callout-rate", _rate, None, _show_rate)  # its probes per second
    tls: str | None = _key("tls", parse_level, None)  # the TLS level (policy/tls_policy.py); None: smtp-tls's
    match: tuple[str, ...] | None = _key("match", parse_match, None, ":".join)  # names for verify, secure
    fingerprint: tuple[str, ...] | None = _key("fingerprint", parse_fingerprints, None, "|".join)
    protocols: str | None = _key("protocols", parse_protocols, None, show_protocols)  # the oldest TLS version
    source: str = ""  # FILE:LINE of the rule that gave these; "" for the defaults

    def describe(self) -> str:
        """The settings as the file writes them, those not set left out:
        `concurrency=5 recipients=50 rate=10/min mx-rollup=yes`."""
        return " ".join(f"{key}={f.metadata['show'](getattr(self, f.name))}"
                        for key, f in KEYS.items() if getattr(self, f.name) is not None)

    def tls_policy(self, default_level: str) -> TLSPolicy:
        """The TLS policy of these settings; `default_level` (smtp-tls) where the rule sets no tls=."""
        return TLSPolicy(self.tls or default_level, self.match or (), self.fingerprint or (), self.protocols or "")


KEYS: dict[str, dataclasses.Field] = {
    f.metadata["key"]: f for f in dataclasses.fields(DestinationSettings) if "key" in f.metadata}
DEFAULTS = DestinationSettings()


def parse_settings(text: str, where: str) -> DestinationSettings:
    """The `key=value ...` of a rule at `where` (FILE:LINE), which starts every error."""
    values: dict[str, Any] = {}
    for item in text.split():
        key, equals, value = item.partition("=")
        known = KEYS.get(key)
        if not equals:
            raise PolicyError(f"{where}: {item!r} is not key=value")
        if known is None:
            raise PolicyError(f"{where}: unknown key {key!r} (known: {', '.join(KEYS)})")
        if known.name in values:
            raise PolicyError(f"{where}: {key} is given twice")
        if not value:
            raise PolicyError(f"{where}: {key} needs a value")
        try:
            values[known.name] = known.metadata["parse"](value)
        except ValueError as exc:
            raise PolicyError(f"{where}: {key} {value!r}: {exc}") from None
    window, concurrency = values.get("initial_window"), values.get("concurrency")
    if window is not None and concurrency is not None and window > concurrency:
        raise PolicyError(f"{where}: initial-window {window} is more than concurrency {concurrency}")
    try:
        check_combination(values.get("tls"), values.get("match"), values.get("fingerprint"), values.get("protocols"))
    except ValueError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    return DestinationSettings(**values, source=where)


def normalize_site(site: str) -> str:
    """The form sites compare in: each host name as normalize_domain gives it, sorted, joined by
    commas, so the order a pattern or a lookup names them in does not matter."""
    return ",".join(sorted(normalize_domain(name) for name in site.split(",")))


class DestinationRules:
    """The rules of one destinations file; with none (no file), every lookup gives the defaults.

    A reload builds a new object, so lookups remembered never outlive the file they were found in.
    """

    def __init__(self, rules: list[tuple[str, DestinationSettings]] | None = None,
                 index: PatternIndex[DestinationSettings] | None = None, path: str = ""):
        self.rules = rules or []  # (pattern, settings) in file order, as written
        self.path = path
        self._index: PatternIndex[DestinationSettings] = index or PatternIndex()
        self._cached = functools.lru_cache(maxsize=CACHE_SIZE)(self._lookup)

    def settings(self, domain: str | None, site: str | None, next_hop: str) -> DestinationSettings:
        """The settings of the first line whose pattern matches `domain` (a recipient's), `site`
        (the MX hosts of the domain, comma-separated) or `next_hop` (NextHop.destination);
        DEFAULTS when none does. None (or "") leaves the domain or the site out."""
        return self._cached(domain or None, site or None, next_hop)

    def for_destination(self, destination: str) -> DestinationSettings:
        """The settings of a destination named as NextHop.destination names it. A destination
        is what one window, one connection limit and one rate are counted against, so a domain
        pattern applies to the destination of MX routing for that domain, a site pattern to the
        site MX rollup made, and mail routed to a relay host or socket is matched by its next hop."""
        kind, _, argument = unquote(destination).partition(":")
        if kind == SITE:
            return self.settings(None, argument, destination)
        return self.settings(argument if kind == MX else None, None, destination)

    def for_tls(self, destination: str, site: str = "") -> DestinationSettings:
        """The settings whose TLS keys apply to a delivery to `destination` (NextHop.destination):
        the first line that matches its domain (MX routing), its site (`site:HOSTS` as MX rollup
        names it, when known) or its next hop. Unlike the limits, which count against the site,
        a level written for a domain holds for that domain whatever MX hosts it shares."""
        kind, _, argument = unquote(destination).partition(":")
        return self.settings(argument if kind == MX else None, site.partition(":")[2] or None, destination)

    def _lookup(self, domain: str | None, site: str | None, next_hop: str) -> DestinationSettings:
        name = normalize_domain(domain) if domain is not None else None
        names = [(DOMAIN, name), (SITE, normalize_site(site) if site is not None else None),
                 (NEXT_HOP, next_hop.lower())]
        return self._index.first(names, name, name) or DEFAULTS


def load_destinations(path: str) -> DestinationRules:
    """Read the file; PolicyError naming FILE:LINE and the problem of every bad line."""
    rules = []
    index: PatternIndex[DestinationSettings] = PatternIndex()
    problems = Problems(PolicyError)
    for position, (where, line) in enumerate(file_lines(path, "destinations")):
        with problems.collecting():
            pattern, text = split_rule(line, where, "settings (key=value ...)")
            settings = parse_settings(text, where)
            _add(index, pattern, where, position, settings)
            rules.append((pattern, settings))
    problems.check()
    return DestinationRules(rules, index, path)


def _add(index: PatternIndex[DestinationSettings], pattern: str, where: str, position: int,
         settings: DestinationSettings) -> None:
    """Check `pattern` and index the rule under what it names."""
    if pattern.startswith("/"):
        index.add_regex(check_pattern(pattern, where), position, settings)
    elif ":" in pattern and not pattern.startswith("["):  # [IPv6:...] is a domain
        index.add_exact(NEXT_HOP, _next_hop(pattern, where), position, settings)
    elif "," in pattern:
        index.add_exact(SITE, _site(pattern, where), position, settings)
    elif "@" in pattern:
        raise PolicyError(f"{where}: {pattern!r}: the destinations file takes domains, sites and next hops, "
                          "not addresses")
    else:
        check_pattern(pattern, where)
        if pattern.startswith("*."):
            index.add_wildcard(normalize_domain(pattern[2:]), position, settings)
        else:
            index.add_exact(DOMAIN, normalize_domain(pattern), position, settings)
            index.add_exact(SITE, normalize_domain(pattern), position, settings)  # a site of one MX host


def _next_hop(pattern: str, where: str) -> str:
    kind = pattern.partition(":")[0].lower()
    if kind not in _HOP_KINDS and not (kind.startswith("queue/") and len(kind) > len("queue/")):
        raise PolicyError(f"{where}: next hop {pattern!r}: {kind!r} is no kind of next hop; write a next hop as "
                          f"`qrouter route` shows its destination, KIND:ARGUMENT with KIND one of "
                          f"{', '.join(_HOP_KINDS)}, queue/NAME")
    return pattern.lower()


def _site(pattern: str, where: str) -> str:
    for name in pattern.split(","):
        if not name or name.startswith(("/", "*.")) or "@" in name:
            raise PolicyError(f"{where}: site {pattern!r}: {name!r} is not a host name (a site is MX host "
                              "names joined by commas)")
        check_pattern(name, where)
    return normalize_site(pattern)
