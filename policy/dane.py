"""DANE for SMTP (RFC 7672, RFC 7671): which TLSA records count, and the TLS policy of one host
under the levels `dane` and `dane-only` given what DNSSEC proved about it, as Postfix decides.

    DNSSEC not trusted (dns-support-level is not dnssec)    dane: may    dane-only: not used
    the host found insecurely (MX or address records        dane: may    dane-only: not used
        without the validating resolver's AD bit)
    the TLSA lookup failed (SERVFAIL, bogus, no answer)     not used, by either level
    no usable TLSA records (none, unsigned, or only         dane: may    dane-only: not used
        PKIX-TA/PKIX-EE and unknown parameters)
    usable TLSA records                                     TLS required, the certificate matched

"Not used" is a host whose deliveries are deferred (4.7.5) with the reason, without a
connection; never one that falls back, since an attacker who can make a lookup fail could
otherwise turn DANE off. Usable records are DANE-TA(2) and DANE-EE(3) with selector 0 (the whole
certificate) or 1 (its SubjectPublicKeyInfo) and matching type 0 (the data itself), 1 (SHA-256)
or 2 (SHA-512); RFC 7672 3.1.3 makes PKIX-TA(0) and PKIX-EE(1) unusable for SMTP.
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


def host_policy(policy: TLSPolicy, host: str, *, trusted: bool, secure: bool,
                tlsa: tuple[list[TLSARecord], bool] | str | None) -> TLSPolicy:
    """The policy of `host` under `policy` (level dane or dane-only, its names resolved): may,
    DANE with its usable records, or a refusal that says why. `trusted`: DNSSEC is trusted (the
    resolver validates); `secure`: the host was found by validated answers; `tlsa`: what its
    TLSA lookup gave, the records and whether they were validated, or why it failed (None when
    it was not asked: not trusted or not secure)."""
    if not trusted:
        return _without_dane(policy, f"{NOT_TRUSTED}, so no DANE for {host}")
    if not secure or tlsa is None:
        return _without_dane(policy, f"{host} was not found by DNSSEC-validated MX and address records")
    if isinstance(tlsa, str):
        return replace(policy, refusal=f"TLSA lookup for {host} failed: {tlsa}", refusal_type=DNSSEC_INVALID)
    records, validated = tlsa
    usable = tuple(record for record in records if record.usable)
    if not records:
        return _without_dane(policy, f"{host} has no TLSA records")
    if not validated:
        return _without_dane(policy, f"the TLSA records of {host} are not DNSSEC-validated")
    if not usable:
        return _without_dane(policy, f"{host} has no usable TLSA records")
    return replace(policy, tlsa=usable)


def _without_dane(policy: TLSPolicy, why: str) -> TLSPolicy:
    """dane becomes may; dane-only refuses the host, saying why."""
    if policy.level == TLS_DANE_ONLY:
        return replace(policy, refusal=f"DANE is required, but {why}", refusal_type=DANE_REQUIRED)
    return TLSPolicy(TLS_MAY, min_protocol=policy.min_protocol)
