"""DKIM signatures on the TLS reports qrouter mails (RFC 8460 5.3: a report sent by mail carries
a valid DKIM signature of the reporting domain, and a receiver may ignore one without).

relaxed/relaxed canonicalization, so that a relay re-folding or re-spacing the header, or
turning line ends into CRLF, leaves the signature valid. The signature covers the fields a
report's receiver reads (RFC 8460 5.3) and that make it what it is: From, To, Subject, Date,
Message-ID, MIME-Version, Content-Type, TLS-Report-Domain, TLS-Report-Submitter and
Auto-Submitted. It has no l= (RFC 8460 5.3 forbids one: the whole body is signed).

The key file is read at each signature, by the process that builds the report
(router/config/dkim_key.py says who that is and what the file must allow); dkimpy is imported
here only, when a report is signed.
"""

from __future__ import annotations

from router.config.dkim_key import DkimKeyError, load_dkim_key

SIGNED_FIELDS = ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type", "TLS-Report-Domain",
                 "TLS-Report-Submitter", "Auto-Submitted")


def sign(message: bytes, key_path: str, selector: str, domain: str) -> bytes:
    """`message` (line ends LF, as queued) with a DKIM-Signature field in front, made with the
    key at `key_path` for `selector`._domainkey.`domain`; DkimKeyError says why it cannot be."""
    import dkim

    key = load_dkim_key(key_path)
    try:
        field = dkim.sign(message, selector.encode(), domain.encode(), key.private,
                          canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=key.algorithm,
                          include_headers=[name.encode() for name in SIGNED_FIELDS], linesep=b"\n", tlsrpt=True)
    except dkim.DKIMException as exc:
        raise DkimKeyError(f"{key_path}: cannot sign with it: {exc}") from None
    return field + message
