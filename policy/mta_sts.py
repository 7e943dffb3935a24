"""MTA-STS (RFC 8461): the grammar of the `_mta-sts` TXT record and of the policy file, and the
decisions a policy makes about MX hosts. Pure: no DNS, no HTTPS, no files (workers/mta_sts.py
finds, fetches and keeps policies).

    _mta-sts.example.com.  TXT  "v=STSv1; id=20240101T000000;"

    https://mta-sts.example.com/.well-known/mta-sts.txt:
        version: STSv1
        mode: enforce
        mx: mx1.example.com
        mx: *.example.net
        max_age: 604800

`enforce`: only MX hosts matching an `mx` pattern are used, each under TLS with a certificate
verified for its name; `testing`: the same checks, whose failures are only reported; `none`: the
domain has no policy (published so that caches forget the one before).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from policy.tls_policy import PROTOCOLS, TLS_DANE_ONLY, TLS_VERIFY, TLSPolicy

ENFORCE, TESTING, NONE = "enforce", "testing", "none"
MODES = (ENFORCE, TESTING, NONE)
MAX_AGE_LIMIT = 31557600  # a year: the most a policy may ask to be cached (RFC 8461 3.2)
MAX_POLICY_BYTES = 64 * 1024  # the size the RFC suggests as a bound on a policy body (3.3)
MIN_PROTOCOL = "TLSv1.2"  # RFC 8461 5: the MX must offer TLS 1.2 or later

_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})+")
_FIELD_NAME = re.compile(r"[A-Za-z0-9_]+")


class STSError(ValueError):
    """A TXT record or policy that does not follow RFC 8461; the message says where and what."""


@dataclass(frozen=True)
class STSPolicy:
    """A policy as its file says it: `mx` patterns in lower case, `max_age` in seconds."""

    mode: str
    mx: tuple[str, ...]
    max_age: int

    def allows(self, host: str) -> bool:
        """Whether the MX host `host` matches one of the policy's patterns (RFC 8461 4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def describe(self) -> str:
        """`mode enforce, mx mx1.example.com *.example.net, max_age 604800`."""
        return f"mode {self.mode}, mx {' '.join(self.mx) or '(none)'}, max_age {self.max_age}"

    def lines(self) -> tuple[str, ...]:
        """The policy as its file's lines, as a TLS report's `policy-string` gives it (RFC 8460 4.4)."""
        return ("version: STSv1", f"mode: {self.mode}", *(f"mx: {pattern}" for pattern in self.mx),
                f"max_age: {self.max_age}")


@dataclass(frozen=True)
class Applied:
    """A policy as it applies to one MX server: `label` names it in log lines and reasons
    (`MTA-STS enforce policy of example.com`); under testing, `fallback` is the server's own TLS
    policy, used when the policy's checks fail. `domain` and `policy` are what a TLS report
    counts the server's sessions under."""

    label: str
    domain: str
    policy: STSPolicy
    fallback: TLSPolicy | None = None


def parse_txt(records: list[str], domain: str) -> str | None:
    """The policy id of the `_mta-sts.DOMAIN` TXT records (each record's strings joined), or
    None when none is an STSv1 record. STSError when the record is not valid, or when there is
    more than one: RFC 8461 3.1 has the domain then treated as publishing none."""
    ours = [record for record in records if record.startswith("v=STSv1")]
    if not ours:
        return None
    if len(ours) > 1:
        raise STSError(f"_mta-sts.{domain}: {len(ours)} TXT records begin with v=STSv1; there must be one")
    fields = _txt_fields(ours[0], domain)
    if fields[0] != ("v", "STSv1"):
        raise STSError(f"_mta-sts.{domain}: the TXT record must begin with v=STSv1;, not {ours[0]!r}")
    ids = [value for key, value in fields if key == "id"]
    if not ids:
        raise STSError(f"_mta-sts.{domain}: the TXT record {ours[0]!r} has no id=")
    if not _TXT_ID.fullmatch(ids[0]):
        raise STSError(f"_mta-sts.{domain}: id {ids[0]!r} must be 1 to 32 letters and digits")
    return ids[0]


def _txt_fields(record: str, domain: str) -> list[tuple[str, str]]:
    fields = []
    for item in record.split(";"):
        item = item.strip(" \t")
        if not item:
            continue  # the record may end with ";"
        key, equals, value = item.partition("=")
        if not equals or not _FIELD_NAME.fullmatch(key):
            raise STSError(f"_mta-sts.{domain}: {item!r} in the TXT record is not key=value")
        fields.append((key, value))
    return fields


def parse_policy(text: str, where: str) -> STSPolicy:
    """The policy of a policy file's text; STSError naming `where` (its URL) and the line.
    Unknown fields are passed over; of a field given twice, the first counts, but `mx`, which
    may be given any number of times (RFC 8461 3.2)."""
    values: dict[str, tuple[int, str]] = {}
    patterns: list[str] = []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(key):
            raise STSError(f"{where} line {number}: {line[:80]!r} is not `key: value`")
        value = value.strip(" \t")
        if key == "mx":
            patterns.append(_mx_pattern(value, f"{where} line {number}"))
        else:
            values.setdefault(key, (number, value))
    version = values.get("version")
    if version is None or version[1] != "STSv1":
        said = f"line {version[0]}: version {version[1]!r}" if version else "no version field"
        raise STSError(f"{where}: {said}; it must be `version: STSv1`")
    mode = values.get("mode")
    if mode is None or mode[1] not in MODES:
        said = f"line {mode[0]}: mode {mode[1]!r}" if mode else "no mode field"
        raise STSError(f"{where}: {said}; it must be one of {', '.join(MODES)}")
    max_age = values.get("max_age")
    if max_age is None or not _MAX_AGE.fullmatch(max_age[1]) or int(max_age[1]) > MAX_AGE_LIMIT:
        said = f"line {max_age[0]}: max_age {max_age[1]!r}" if max_age else "no max_age field"
        raise STSError(f"{where}: {said}; it must be a number of seconds from 0 to {MAX_AGE_LIMIT}")
    if not patterns and mode[1] != NONE:
        raise STSError(f"{where}: mode {mode[1]} needs at least one `mx:` line")
    return STSPolicy(mode[1], tuple(patterns), int(max_age[1]))


def _mx_pattern(value: str, where: str) -> str:
    pattern = value.lower().rstrip(".")
    if not _MX_PATTERN.fullmatch(pattern):
        raise STSError(f"{where}: mx {value!r} must be a host name, or *. and a domain (*.example.com)")
    return pattern


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: `*.example.com` matches one label under example.com (mx.example.com, not
    example.com nor a.b.example.com); any other pattern only the host itself. No case, no final dot."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first and dot) and rest == pattern[2:]
    return host == pattern


def applies(explicit: bool, level: str, dane: bool) -> bool:
    """Whether a domain's MTA-STS policy is used for its MX hosts: not where the destinations
    file sets tls= for it (`explicit`), not under dane-only (a host without DANE is not used at
    all), and not where DANE authenticates its MX hosts (`dane`; RFC 8461 section 2)."""
    return not explicit and level != TLS_DANE_ONLY and not dane


def enforced_tls(host: str, own: TLSPolicy) -> TLSPolicy:
    """The TLS an MX host the policy names is used under (RFC 8461 4.2): required, a chain to a
    trusted CA, a name that matches the host itself (as the `verify` level checks, without the
    next-hop domain), TLS 1.2 or later (or the newer version `own` asks for)."""
    oldest = max(own.min_protocol or MIN_PROTOCOL, MIN_PROTOCOL, key=PROTOCOLS.index)
    return TLSPolicy(TLS_VERIFY, (host.lower(),), (), oldest)
