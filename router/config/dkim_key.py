"""The DKIM key that signs mailed TLS reports (RFC 8460 5.3): `tls-report-dkim-key`, and the
names that go with it (`tls-report-dkim-selector`, `tls-report-dkim-domain`).

The key file is a PEM private key, RSA (PKCS#1 or PKCS#8, at least 1024 bits, RFC 8301) or
Ed25519 (PKCS#8), unencrypted: the daemon starts unattended. It is read where it is used, by the
process that builds a report (a network worker, as the daemon's user, or `qrouter tls-report
send` become that user), so the daemon's user must be able to read it, and nobody else should:
root:qrouter 0640. A file others may read is refused, as anyone on the machine could sign mail
as the domain with it. The config check reads it with the same function, so a key that passes
`qrouter check-config` is one the signer takes.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from dataclasses import dataclass, field

from policy.policy_file import read_bytes

RSA_SHA256, ED25519_SHA256 = b"rsa-sha256", b"ed25519-sha256"  # DKIM's a= (RFC 6376, RFC 8463)
MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers ignore signatures of smaller keys
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class DkimKeyError(ValueError):
    """A key file that cannot sign; the message names the file and what is wrong."""


@dataclass(frozen=True)
class DkimKey:
    """A private key in the form dkimpy signs with: `algorithm` is the signature's a=, `private`
    a PKCS#1 PEM for RSA, the base64 of the 32-byte seed for Ed25519."""

    algorithm: bytes
    private: bytes = field(repr=False)  # never in a log line or a traceback


def load_dkim_key(path: str) -> DkimKey:
    """The key in the PEM file at `path`; DkimKeyError says why it cannot be used."""
    from cryptography.exceptions import UnsupportedAlgorithm  # only where a key is set
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    data = read_bytes(path, DkimKeyError, what="DKIM key")
    mode = os.stat(path).st_mode
    if mode & stat.S_IRWXO:
        raise DkimKeyError(f"{path}: others may read it (mode {stat.S_IMODE(mode):04o}); make it 0640, "
                           "owned by root and the daemon user's group")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # a password was needed
        raise DkimKeyError(f"{path}: the key is encrypted; the daemon needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DkimKeyError(f"{path}: not a PEM private key ({exc})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"{path}: an RSA key of {key.key_size} bits; DKIM needs at least {MIN_RSA_BITS}")
        return DkimKey(RSA_SHA256, key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                                     serialization.NoEncryption()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return DkimKey(ED25519_SHA256, base64.b64encode(key.private_bytes_raw()))
    raise DkimKeyError(f"{path}: neither an RSA nor an Ed25519 key, the two DKIM signs with")


def check_dns_name(text: str) -> str:
    """A selector or signing domain: DNS labels of letters, digits and hyphens (A-labels for
    other scripts), separated by dots, as RFC 6376 3.1 and 3.5 write them; ValueError otherwise."""
    name = text.rstrip(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError("must be DNS labels of letters, digits and hyphens (at most 63 each), separated by dots")
    return name.lower()
