"""A server's certificate chain checked against a host's TLSA records (RFC 7671 5, RFC 7672 3),
after a handshake that verified nothing (workers/tls.py makes the context of a DANE level so):

    DANE-EE(3)  the server's own certificate matches; its names and dates are not checked
                (RFC 7672 3.1.1: the record is the key's binding to the name)
    DANE-TA(2)  some certificate of the chain the server sent matches, the server's certificate
                chains up to it (each link signed by the next, a CA, within its dates), and the
                server's certificate names the MX host, the next-hop domain or the alias
                target the records are at (the policy's `match`; RFC 7672 3.2.2)

The chain is the one the server sent, which the ssl module hands out only unverified; see
`peer_chain`. The cryptography package does the rest.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from policy.dane import DANE_EE, DANE_TA, TLSARecord
from policy.tls_policy import TLSPolicy
from workers.tls import certificate_names, name_matches

_DIGESTS = {0: lambda data: data, 1: lambda data: hashlib.sha256(data).digest(),
            2: lambda data: hashlib.sha512(data).digest()}


def peer_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The certificates the server sent, its own first, as DER. Python 3.13 has
    SSLSocket.get_unverified_chain(); 3.11 and 3.12 have it only on the socket's _sslobj."""
    public = getattr(sock, "get_unverified_chain", None)
    if public is not None:
        return list(public() or [])
    chain = sock._sslobj.get_unverified_chain() or []  # type: ignore[union-attr]
    return [certificate.public_bytes(ssl._ssl.ENCODING_DER) for certificate in chain]  # type: ignore[attr-defined]


def check(sock: ssl.SSLSocket, policy: TLSPolicy, names: tuple[str, ...]) -> str:
    """Why the server's chain does not pass the policy's TLSA records ("" when it does);
    `names` are those a DANE-TA match needs the server's certificate to carry."""
    chain = [x509.load_der_x509_certificate(der) for der in peer_chain(sock)]
    if not chain:
        return "not verified by DANE: the server sent no certificate"
    leaf = chain[0]
    if any(record.usage == DANE_EE and matches(record, leaf) for record in policy.tlsa):
        return ""
    anchors = [(index, record) for index, certificate in enumerate(chain) for record in policy.tlsa
               if record.usage == DANE_TA and matches(record, certificate)]
    if not anchors:
        return f"not verified by DANE: no certificate it sent matches TLSA {' or '.join(map(str, policy.tlsa))}"
    index, record = anchors[0]
    broken = _path_problem(chain, index)
    if broken:
        return f"not verified by DANE: its chain to the trust anchor of TLSA {record} {broken}"
    found = certificate_names(_as_ssl_dict(leaf))
    if not any(name_matches(name, wanted) for name in found for wanted in names):
        return (f"not verified by DANE (TLSA {record}) for {', '.join(names)}: "
                f"the certificate names {', '.join(found) or 'nothing'}")
    return ""


def matches(record: TLSARecord, certificate: x509.Certificate) -> bool:
    """Whether `record` designates `certificate`: its selected part (the whole certificate, or
    its SubjectPublicKeyInfo) in the record's matching type is the record's data."""
    if record.selector == 0:
        selected = certificate.public_bytes(Encoding.DER)
    else:
        selected = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return _DIGESTS[record.matching](selected) == record.data


def _path_problem(chain: list[x509.Certificate], anchor: int) -> str:
    """Why the server's certificate (chain[0]) does not chain up to chain[anchor] through the
    other certificates sent ("" when it does). Every certificate below the anchor must be within
    its dates; the anchor's own are not checked (RFC 7671 5.2.2)."""
    now = datetime.datetime.now(datetime.UTC)
    current, used = chain[0], {0}
    while current is not chain[anchor]:
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            return f"fails: {current.subject.rfc4514_string()} is not valid now"
        issuer = next((index for index, candidate in enumerate(chain)
                       if index not in used and _issued(current, candidate)), None)
        if issuer is None:
            return f"fails: nothing it sent issued {current.subject.rfc4514_string()}"
        used.add(issuer)
        current = chain[issuer]
    return ""


def _issued(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` is a CA that signed `certificate`."""
    try:
        if not issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
        certificate.verify_directly_issued_by(issuer)
    except (x509.ExtensionNotFound, InvalidSignature, ValueError, TypeError):
        return False
    return True


def _as_ssl_dict(certificate: x509.Certificate) -> dict:
    """The names of `certificate` in the form ssl.getpeercert() gives, for certificate_names."""
    try:
        alternatives = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        san = tuple([("DNS", name) for name in alternatives.get_values_for_type(x509.DNSName)]
                    + [("IP Address", str(ip)) for ip in alternatives.get_values_for_type(x509.IPAddress)])
    except x509.ExtensionNotFound:
        san = ()
    common = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return {"subjectAltName": san, "subject": tuple((("commonName", str(cn.value)),) for cn in common)}
