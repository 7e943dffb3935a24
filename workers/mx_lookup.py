"""Where mail for a domain goes: the DNS half of MX routing (RFC 5321 section 5.1).

`next_hops` turns a destination into the hosts to try, best first, each with its addresses, so
the SMTP transport only connects and never has to know DNS. Every DNS failure becomes one
`MXLookupError` whose enhanced status code already says bounce (5.X.X) or defer (4.X.X): a
name that does not exist is final, a server that does not answer is not.

Destinations take Postfix's notation: `example.org` looks up MX records, `[host]` and `[ip]`
skip the MX lookup and go to that host. Relay hosts are resolved with `resolve_host`.

A resolver made with `dnssec` (the `dns-support-level dnssec` key: the administrator declares
the resolver a validating one on a trusted path) is asked with the DO and AD flags, and its AD
bit marks an answer as DNSSEC-validated: each MXHost says whether its MX and address records
were (`secure`), which DANE needs (RFC 7672 2.2), and, for a host name that is an alias, where
its CNAME chain ends when DNSSEC validated all of it (`alias`); `host_tls` finds a host's TLSA
records. Any other resolver's AD bit is never read.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from policy.dane import TLSARecord, host_policy, tlsa_names
from policy.tls_policy import TLSPolicy
from router.config.dns_servers import ResolverConfigError, parse_dns_servers
from router.spool.address import AddressError, check_domain
from workers.mx_hosts import MXHost, MXLookupError, address_literal

DEFAULT_TIMEOUT = 10.0
CACHE_NAMES = 4096  # answers a delivering worker keeps (each for its TTL): the domains and MX hosts mail goes to

NULL_MX = "5.1.10"  # RFC 7505: the domain says it accepts no mail
NO_DOMAIN = "5.1.2"  # the recipient's domain does not exist, or cannot receive mail
BAD_SYNTAX = "5.1.3"  # not something DNS can be asked about
NO_HOST = "5.4.4"  # a host named in the configuration does not exist
TRY_AGAIN = "4.4.3"  # DNS could not answer now; the same question may work later

_DOTTED_NUMBERS = re.compile(r"[0-9.]+")


def make_resolver(servers: str = "", timeout: float = DEFAULT_TIMEOUT,
                  resolv_conf: str = "/etc/resolv.conf", cache: int = 0, dnssec: bool = False) -> dns.resolver.Resolver:
    """A resolver asking `servers` (dns-servers notation), or those of `resolv_conf` when empty.

    `timeout` bounds one whole query, every server and retry included, so a dead DNS delays a
    delivery by a known amount. Each server gets an equal share of it, so a silent first server
    does not use up the time the next one needed.

    With `cache`, it keeps up to that many answers, each as long as its TTL allows (NXDOMAIN as
    long as the zone's SOA says), as a local caching resolver would: a stream of mail to one
    domain asks DNS once a TTL, not several questions a message. Failures are not kept.

    With `dnssec`, queries carry DO and AD (RFC 6840 5.7), so a validating resolver says in the
    AD bit of each answer whether it validated it; only such a resolver's AD bit is believed.
    """
    if not timeout > 0 or timeout == float("inf"):
        raise ResolverConfigError(f"DNS timeout {timeout!r} must be a number of seconds above 0")
    if servers.strip():
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port)
                                for address, port in parse_dns_servers(servers)]
    else:
        try:
            resolver = dns.resolver.Resolver(filename=resolv_conf)
        except dns.resolver.NoResolverConfiguration as exc:
            raise ResolverConfigError(
                f"{resolv_conf}: {exc}; it must list a nameserver, or dns-servers must be set") from None
    resolver.lifetime = timeout
    resolver.timeout = timeout / len(resolver.nameservers)
    resolver.search = []
    if dnssec:
        resolver.use_edns(0, dns.flags.DO, 1232)
        resolver.flags = dns.flags.RD | dns.flags.AD
    if cache:
        resolver.cache = dns.resolver.LRUCache(cache)
    return resolver


def next_hops(destination: str, resolver: dns.resolver.Resolver,
              rng: random.Random | None = None) -> list[MXHost]:
    """Hosts to try for `destination`, best first: MX routing for a domain, the host itself for
    `[host]` or an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`, `[2001:db8::1]`)."""
    if destination.startswith("[") and destination.endswith("]"):
        inside = destination[1:-1]
        literal = address_literal(inside)
        if literal is not None:
            return [MXHost(literal, 0, (literal,))]
        if inside.lower().startswith("ipv6:") or _DOTTED_NUMBERS.fullmatch(inside):
            raise MXLookupError(BAD_SYNTAX, f"{destination}: not a valid IPv4 or IPv6 address literal")
        found = _resolve_host(inside, resolver)
        return [MXHost(_host_name(_name(inside)), 0, found.addresses, *found.dane(True))]
    return lookup_mx(destination, resolver, rng)


def lookup_mx(domain: str, resolver: dns.resolver.Resolver, rng: random.Random | None = None) -> list[MXHost]:
    """MX hosts of a recipient domain by preference; equal preferences in a new random order on
    each call, so retries and parallel deliveries spread over them (RFC 5321 section 5.1)."""
    try:
        check_domain(domain.rstrip("."), domain)
    except AddressError as exc:
        raise MXLookupError(BAD_SYNTAX, f"{domain}: {exc}") from None
    if domain.startswith("["):
        raise MXLookupError(BAD_SYNTAX, f"{domain}: an address literal has no MX records")
    name = _name(domain)
    shown = _shown(domain, name)
    answer = _query(resolver, name, dns.rdatatype.MX)
    if isinstance(answer, _Failure):
        if answer.not_found:
            raise MXLookupError(NO_DOMAIN, f"{shown}: domain does not exist (NXDOMAIN)")
        raise MXLookupError(TRY_AGAIN, f"{shown}: MX lookup failed: {answer.reason}")
    if not answer.records:
        return [_implicit_mx(name, shown, resolver, answer.secure)]
    real = [record for record in answer.records if record.exchange != dns.name.root]
    if not real:
        raise MXLookupError(NULL_MX, f"{shown}: domain accepts no mail (null MX, RFC 7505)")
    return _resolve_exchanges(shown, real, resolver, (rng or random).shuffle, answer.secure)


def _implicit_mx(name: dns.name.Name, shown: str, resolver: dns.resolver.Resolver, secure: bool) -> MXHost:
    """A domain without MX records is its own mail host (RFC 5321 section 5.1); `secure`: the
    answer that it has none was validated."""
    found = _addresses(resolver, name)
    if found.addresses:
        return MXHost(_host_name(name), 0, found.addresses, *found.dane(secure))
    failures = found.failures
    if all(failure.final for failure in failures):
        raise MXLookupError(NO_DOMAIN, f"{shown}: domain has no MX, A or AAAA records")
    raise MXLookupError(TRY_AGAIN, f"{shown}: no MX records, and the address lookup failed: "
                        f"{_reasons(failures)}")


def _resolve_exchanges(shown: str, records: list, resolver: dns.resolver.Resolver,
                       shuffle: Callable[[list], None], secure: bool) -> list[MXHost]:
    """The hosts of MX `records` with their addresses; `secure`: the MX answer was validated,
    so a host is secure when its addresses were too (RFC 7672 2.2.1, 2.2.2)."""
    by_preference: dict[int, list[dns.name.Name]] = {}
    seen: set[dns.name.Name] = set()
    for record in sorted(records, key=lambda r: r.preference):
        if record.exchange not in seen:
            seen.add(record.exchange)
            by_preference.setdefault(record.preference, []).append(record.exchange)
    hosts, skipped = [], []
    for preference in sorted(by_preference):
        exchanges = by_preference[preference]
        shuffle(exchanges)
        for exchange in exchanges:
            found = _addresses(resolver, exchange)
            host = _host_name(exchange)
            if found.addresses:
                hosts.append(MXHost(host, preference, found.addresses, *found.dane(secure)))
            else:
                skipped.append(f"{host}: {_reasons(found.failures)}")
    if not hosts:
        raise MXLookupError(TRY_AGAIN, f"{shown}: no MX host has an address ({'; '.join(skipped)})")
    return hosts


def resolve_host(host: str, resolver: dns.resolver.Resolver) -> tuple[str, ...]:
    """Addresses of a host named in the configuration (relay host, `[host]`), without MX lookup.

    One address family failing for a moment while the other answers still gives a usable host.
    """
    return _resolve_host(host, resolver).addresses


def _resolve_host(host: str, resolver: dns.resolver.Resolver) -> _Addresses:
    """resolve_host, with what DNSSEC proved of the addresses."""
    name = _name(host)
    shown = _shown(host, name)
    found = _addresses(resolver, name)
    if found.addresses:
        return found
    if all(failure.final for failure in found.failures):
        raise MXLookupError(NO_HOST, f"{shown}: host not found ({_reasons(found.failures)})")
    raise MXLookupError(TRY_AGAIN, f"{shown}: address lookup failed: {_reasons(found.failures)}")


def lookup_txt(name: str, resolver: dns.resolver.Resolver) -> list[str]:
    """The TXT records of `name`, each record's strings joined as one text (RFC 7208 3.3 does so
    too); [] when it has none or does not exist. MXLookupError (4.4.3) when DNS cannot answer now."""
    records = _query(resolver, _name(name), dns.rdatatype.TXT)
    if isinstance(records, _Failure):
        if records.final:
            return []
        raise MXLookupError(TRY_AGAIN, f"{name}: TXT lookup failed: {records.reason}")
    return [b"".join(record.strings).decode("utf-8", "replace") for record in records.records]


def _name(text: str) -> dns.name.Name:
    """The absolute name to ask about; U-labels become A-labels here (IDNA)."""
    if not text.strip(".") or any(c.isspace() for c in text):
        raise MXLookupError(BAD_SYNTAX, f"{text!r}: not a domain name")
    try:
        return dns.name.from_text(text)
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise MXLookupError(BAD_SYNTAX, f"{text!r}: not a valid domain name ({exc})") from None


def _host_name(name: dns.name.Name) -> str:
    """Lower case, since answers may echo the case the question was asked in."""
    return name.to_text(omit_final_dot=True).lower()


def _shown(text: str, name: dns.name.Name) -> str:
    """The name as the sender wrote it, with the A-labels asked about when they differ."""
    asked = name.to_text(omit_final_dot=True)
    return text if text.rstrip(".").lower() == asked.lower() else f"{text} ({asked})"


@dataclass(frozen=True)
class _Answer:
    """The records of one type (empty for NODATA), whether a trusted resolver validated them
    (the CNAME chain that led to them included), and the name they are at, where that chain
    ended (the name asked when there is none)."""

    records: list
    secure: bool
    canonical: dns.name.Name | None = None


@dataclass(frozen=True)
class _Failure:
    """Why a query gave no records; `not_found` is NXDOMAIN, `final` also counts NODATA."""

    reason: str
    not_found: bool = False
    final: bool = False


@dataclass(frozen=True)
class _Addresses:
    """What an address lookup found: the addresses, why a family gave none, whether DNSSEC
    validated them (`validated`; for an alias, every link of its chain) or at least the first
    link of the host name's CNAME chain (`alias_secure`), and where that chain ended (`target`,
    None for a name that is no alias)."""

    addresses: tuple[str, ...]
    failures: list[_Failure]
    validated: bool
    target: dns.name.Name | None = None
    alias_secure: bool = False

    def dane(self, found_securely: bool) -> tuple[bool, str]:
        """MXHost's `secure` and `alias`, for a host itself found securely or not (its MX
        records): secure when its addresses were validated, or, for an alias, the CNAME record
        of its name, however its target was found (RFC 7672 2.2.2); the alias's target only
        when the whole chain was validated, since only then do its TLSA records count."""
        secure = found_securely and (self.validated or self.alias_secure)
        return secure, _host_name(self.target) if secure and self.validated and self.target else ""


def _addresses(resolver: dns.resolver.Resolver, name: dns.name.Name) -> _Addresses:
    """The A and AAAA addresses of `name`, why a family gave none, and what DNSSEC proved of
    them; for an alias whose chain was not validated to its end, whether its first link was
    (one more question, CNAME, which a validating resolver answers with that link alone)."""
    addresses: list[str] = []
    failures: list[_Failure] = []
    secure = True
    target = None
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        answer = _query(resolver, name, rdtype)
        if isinstance(answer, _Failure):
            failures.append(answer)
            if answer.not_found:
                break  # the name does not exist for AAAA either: no need to wait for it
        elif answer.records:
            addresses.extend(record.address for record in answer.records)
            secure = secure and answer.secure
            target = target or (answer.canonical if answer.canonical != name else None)
        else:
            failures.append(_Failure(f"no {dns.rdatatype.to_text(rdtype)} record", final=True))
    validated = secure and bool(addresses)
    alias_secure = False
    if target is not None and addresses and not validated and _validating(resolver):
        link = _query(resolver, name, dns.rdatatype.CNAME)
        alias_secure = isinstance(link, _Answer) and link.secure and bool(link.records)
    return _Addresses(tuple(addresses), failures, validated, target, alias_secure)


def host_tls(policy: TLSPolicy, host: str, port: int, secure: bool, resolver: dns.resolver.Resolver,
             alias: str = "") -> TLSPolicy:
    """The TLS policy of `host` (found securely or not; `alias`: where its CNAME chain ends,
    when DNSSEC validated all of it) on `port` under a DANE level: its TLSA records looked up
    when DNSSEC can prove them, at the alias's target first and at the host name when there
    are none there (RFC 7672 2.2.2; policy/dane.py decides)."""
    trusted = _validating(resolver)
    found, base = None, host
    if trusted and secure:
        for base in tlsa_names(host, alias):
            found = lookup_tlsa(base, port, resolver)
            if isinstance(found, str) or (found[0] and found[1]):
                break  # a failure, or validated records: the next name is not asked
    return host_policy(policy, host, trusted=trusted, secure=secure, tlsa=found, base=base)


def lookup_tlsa(host: str, port: int, resolver: dns.resolver.Resolver) -> tuple[list[TLSARecord], bool] | str:
    """The TLSA records of `host` for SMTP on `port` (`_PORT._tcp.HOST`, RFC 7672 2.2.3) and
    whether they were validated; none (securely or not) is an empty list. When the lookup
    fails (SERVFAIL, which a validating resolver answers for a bogus signature, or no answer),
    why: DANE then may neither be used nor be passed over."""
    answer = _query(resolver, dns.name.from_text(f"_{port}._tcp.{host}"), dns.rdatatype.TLSA)
    if isinstance(answer, _Failure):
        return ([], False) if answer.final else answer.reason
    return [TLSARecord(r.usage, r.selector, r.mtype, r.cert) for r in answer.records], answer.secure


def _query(resolver: dns.resolver.Resolver, name: dns.name.Name,
           rdtype: dns.rdatatype.RdataType) -> _Answer | _Failure:
    """Records of one type (an empty list for NODATA), or why there are none."""
    try:
        answer = resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
    except dns.resolver.NXDOMAIN:
        return _Failure("NXDOMAIN", not_found=True, final=True)
    except dns.resolver.YXDOMAIN:
        return _Failure("name too long after DNAME substitution", not_found=True, final=True)
    except dns.exception.Timeout:
        return _Failure(f"no answer from the DNS servers within {resolver.lifetime:g}s")
    except dns.resolver.NoNameservers as exc:
        return _Failure(f"DNS servers failed: {_server_errors(exc)}")
    except dns.exception.DNSException as exc:
        return _Failure(f"DNS error: {exc}")
    validated = _validating(resolver) and bool(answer.response.flags & dns.flags.AD)
    return _Answer(list(answer.rrset) if answer.rrset is not None else [], validated, answer.canonical_name)


def _validating(resolver: dns.resolver.Resolver) -> bool:
    """Whether `resolver` asks for validation (make_resolver's `dnssec`): its AD bit is believed."""
    return bool(resolver.flags and resolver.flags & dns.flags.AD)


def _server_errors(exc: dns.resolver.NoNameservers) -> str:
    """'Do53:127.0.0.1@53 answered SERVFAIL' rather than dnspython's dump of the whole query."""
    texts = []
    for server, _tcp, _port, error, response in exc.kwargs.get("errors", []):
        texts.append(f"{server} answered {dns.rcode.to_text(response.rcode())}" if response is not None
                     else f"{server} failed: {error}")
    return "; ".join(dict.fromkeys(texts)) or "no server could be asked"


def _reasons(failures: list[_Failure]) -> str:
    return ", ".join(dict.fromkeys(failure.reason for failure in failures))
