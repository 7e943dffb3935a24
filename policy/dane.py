"""DANE for SMTP (RFC 7672, RFC 7671): which TLSA records count, and the TLS policy of one host
under the levels `dane` and `dane-only` given what DNSSEC proved about it, as Postfix decides.

    DNSSEC not trusted (dns-support-level is not dnssec)    dane: may    dane-only: not used
    the host found insecurely (MX or address records        dane: may    dane-only: not used
        without the validating resolver's AD bit)
    the TLSA lookup failed (SERVFAIL, bogus, no answer)     not used, by either level
    no TLSA records (none, or unsigned)                     dane: may    dane-only: not used
    validated TLSA records, none of them usable (only       dane: TLS required, the certificate
        PKIX-TA/PKIX-EE or unknown parameters)              unchecked    dane-only: not used
    usable TLSA records                                     TLS required, the certificate matched

"Not used" is a host whose deliveries are deferred (4.7.5) with the reason, without a
connection; never one that falls back, since an attacker who can make a lookup fail could
otherwise turn DANE off. Usable records are DANE-TA(2) and DANE-EE(3) with selector 0 (the whole
certificate) or 1 (its SubjectPublicKeyInfo) and matching type 0 (the data itself), 1 (SHA-256)
or 2 (SHA-512); RFC 7672 3.1.3 makes PKIX-TA(0) and PKIX-EE(1) unusable for SMTP. Validated
records none of which is usable still say the server does TLS: RFC 7672 2.2 has the client
require it, without authenticating the server (Postfix's own `encrypt`, not qrouter's, which
verifies).

Where the host name is an alias whose CNAME chain DNSSEC validated to its end, the TLSA records
are looked for at that end first, and at the host name only when there are none there (RFC 7672
2.2.2, `tlsa_names`); the name they were found at is the policy's `tlsa_base`, and a DANE-TA
certificate may name it as well as the host and the next-hop domain (RFC 7672 3.2.2).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from policy.tls_policy import TLS_DANE_ONLY, TLS_MAY, TLSPolicy
from policy.tls_report import DANE_REQUIRED, DNSSEC_INVALID

DANE_TA, DANE_EE = 2, 3
SELECTORS = {0: "certificate", 1: "public key"}
MATCHING = {0: "full", 1: "SHA-256", 2: "SHA-512"}
NOT_TRUSTED = "DNSSEC is not trusted (dns-support-level is not dnssec)"


@dataclass(frozen=True)
class TLSARecord:
    """One TLSA record (RFC 6698 2.1): certificate usage, selector, matching type, data."""

    usage: int
    selector: int
    matching: int
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (DANE_TA, DANE_EE) and self.selector in SELECTORS and self.matching in MATCHING

    def __str__(self) -> str:
        """As a zone file writes it: `3 1 1 8f2a...`."""
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"


def tlsa_names(host: str, alias: str) -> tuple[str, ...]:
    """The names whose TLSA records count for `host`, in the order asked (RFC 7672 2.2.2): the
    end of its CNAME chain (`alias`, given only when DNSSEC validated the whole chain) first,
    then the host name itself, the only one when it is no alias or the chain was not validated."""
    return (alias, host) if alias and alias != host else (host,)


def host_policy(policy: TLSPolicy, host: str, *, trusted: bool, secure: bool,
                tlsa: tuple[list[TLSARecord], bool] | str | None, base: str = "") -> TLSPolicy:
    """The policy of `host` under `policy` (level dane or dane-only, its names resolved): may,
    DANE with its usable records, TLS unauthenticated for records none of which is usable, or
    a refusal that says why. `trusted`: DNSSEC is trusted (the resolver validates); `secure`:
    the host was found by validated answers; `tlsa`: what the TLSA lookup at `base` (by default
    the host name; see tlsa_names) gave, the records and whether they were validated, or why it
    failed (None when it was not asked: not trusted or not secure)."""
    if not trusted:
        return _without_dane(policy, f"{NOT_TRUSTED}, so no DANE for {host}")
    if not secure or tlsa is None:
        return _without_dane(policy, f"{host} was not found by DNSSEC-validated MX and address records")
    base = base or host
    if isinstance(tlsa, str):
        return replace(policy, refusal=f"TLSA lookup for {base} failed: {tlsa}", refusal_type=DNSSEC_INVALID)
    records, validated = tlsa
    usable = tuple(record for record in records if record.usable)
    if not records:
        return _without_dane(policy, f"{host} has no TLSA records")
    if not validated:
        return _without_dane(policy, f"the TLSA records of {base} are not DNSSEC-validated")
    if not usable and policy.level == TLS_DANE_ONLY:
        return _without_dane(policy, f"{base} has no usable TLSA records")
    names = tuple(dict.fromkeys((base, *policy.match)))  # a DANE-TA certificate may name where the records are
    if not usable:
        return replace(policy, tlsa_unusable=tuple(records), tlsa_base=base, match=names)
    return replace(policy, tlsa=usable, tlsa_base=base, match=names)


def _without_dane(policy: TLSPolicy, why: str) -> TLSPolicy:
    """dane becomes may; dane-only refuses the host, saying why."""
    if policy.level == TLS_DANE_ONLY:
        return replace(policy, refusal=f"DANE is required, but {why}", refusal_type=DANE_REQUIRED)
    return TLSPolicy(TLS_MAY, min_protocol=policy.min_protocol)
