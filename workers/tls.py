"""The TLS side of an outbound session under a TLSPolicy (policy/tls_policy.py): the context a
handshake uses, and the checks of the server's certificate that the level asks for after it.

Names are matched here rather than by the ssl module's check_hostname, which takes one name:
`verify` accepts the MX host or the next-hop domain, `secure` a list from the policy, with
`.domain` for any name under it. The chain itself is the ssl module's (CERT_REQUIRED), but under
DANE, whose trust comes from TLSA records rather than from CAs: workers/dane.py checks it then.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl

from policy.tls_policy import DANE_LEVELS, NAMED_LEVELS, TLS_FINGERPRINT, TLSPolicy
from policy.tls_report import (
    CERTIFICATE_EXPIRED,
    CERTIFICATE_HOST_MISMATCH,
    CERTIFICATE_NOT_TRUSTED,
    VALIDATION_FAILURE,
)

VERIFIED, UNTRUSTED, ANONYMOUS = "Verified", "Untrusted", "Anonymous"  # as Postfix's log lines say
# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) TLS reports name apart
_EXPIRED, _HOSTNAME_MISMATCH, _IP_MISMATCH = 10, 62, 64
_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
             "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def context(policy: TLSPolicy, ca_file: str | None) -> ssl.SSLContext:
    """A client context: the chain verified (to `ca_file`, else the system's store) for the
    levels that check names; unchecked for may and fingerprint, whose checks are the digests'
    or none, and for DANE, whose checks are the TLSA records'. OSError or ValueError when the
    CA file cannot be loaded."""
    if policy.level in NAMED_LEVELS:
        made = ssl.create_default_context(cafile=ca_file)
        made.check_hostname = False  # names are matched by check_peer: more than one may do
    else:
        made = ssl.create_default_context()
        made.check_hostname = False
        made.verify_mode = ssl.CERT_NONE
    if policy.min_protocol:
        made.minimum_version = max(made.minimum_version, _VERSIONS[policy.min_protocol])
    return made


def check_peer(sock: ssl.SSLSocket, policy: TLSPolicy, names: tuple[str, ...]) -> str:
    """Why the certificate does not pass the policy's checks ("" when it does), after a
    handshake that verified its chain where the level asks for that. `names` are those it must
    match under a named level (and a DANE-TA record's certificate)."""
    if policy.level in NAMED_LEVELS:
        found = certificate_names(sock.getpeercert() or {})
        if not any(name_matches(name, wanted) for name in found for wanted in names):
            return f"not verified for {', '.join(names)}: the certificate names {', '.join(found) or 'nothing'}"
    elif policy.level == TLS_FINGERPRINT:
        der = sock.getpeercert(binary_form=True)
        if der is None:
            return "not verified by fingerprint: the server sent no certificate"
        digests = digests_of(der)
        if not digests & set(policy.fingerprints):
            return f"not verified by fingerprint: its SHA-256 digests {' and '.join(sorted(digests))} are not listed"
    elif policy.level in DANE_LEVELS and policy.tlsa:  # with unusable records only, nothing is checked
        from workers import dane  # the cryptography package only for the levels that need it

        return dane.check(sock, policy, names)
    return ""


def result_type(exc: BaseException) -> str:
    """What TLS reports (RFC 8460 4.3.1) call a failed handshake: a chain that did not verify
    is an expired or untrusted certificate (or one for other names), anything else a failure
    of validation in general."""
    if not isinstance(exc, ssl.SSLCertVerificationError):
        return VALIDATION_FAILURE
    if exc.verify_code == _EXPIRED:
        return CERTIFICATE_EXPIRED
    if exc.verify_code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        return CERTIFICATE_HOST_MISMATCH
    return CERTIFICATE_NOT_TRUSTED


def trust(sock: ssl.SSLSocket, policy: TLSPolicy) -> str:
    """How Postfix would call the session: Verified (the level's checks passed), Untrusted
    (a certificate nobody checked: under may, or DANE with unusable TLSA records only) or
    Anonymous (none at all)."""
    if sock.getpeercert(binary_form=True) is None:
        return ANONYMOUS
    return VERIFIED if policy.authenticated else UNTRUSTED


def describe(sock: ssl.SSLSocket) -> str:
    """`TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`, as Postfix words a session."""
    cipher = sock.cipher()
    if not cipher:
        return f"{sock.version()} with cipher unknown"
    name, _, bits = cipher
    return f"{sock.version()} with cipher {name} ({bits}/{bits} bits)"


def certificate_names(certificate: dict) -> list[str]:
    """The names of a certificate (ssl's dict form): the DNS names and IP addresses of its
    subjectAltName, or, only when it has none, its subject's common name (RFC 6125 6.4.4)."""
    names = [value for kind, value in certificate.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    if names:
        return names
    return [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]


def name_matches(presented: str, wanted: str) -> bool:
    """Whether a certificate name covers `wanted` (a host name, or `.domain` for any name under
    it). A wildcard counts only as the whole leftmost label (`*.example.com`), one label deep."""
    presented = presented.lower().rstrip(".")
    wanted = wanted.lower().rstrip(".")
    if _address(presented) or _address(wanted):  # an IP address matches only itself, however written
        return _address(presented) == _address(wanted)
    if wanted.startswith("."):
        return presented.endswith(wanted)
    if presented.startswith("*."):
        return wanted.partition(".")[2] == presented[2:] and "." in presented[2:]
    return presented == wanted


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def digests_of(der: bytes) -> set[str]:
    """The SHA-256 digests of a certificate and of its public key (SubjectPublicKeyInfo), hex."""
    from cryptography import x509  # only the fingerprint level needs it
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = x509.load_der_x509_certificate(der).public_key().public_bytes(Encoding.DER,
                                                                        PublicFormat.SubjectPublicKeyInfo)
    return {hashlib.sha256(der).hexdigest(), hashlib.sha256(key).hexdigest()}
