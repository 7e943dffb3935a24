"""The DSN parameters of RFC 3461 as a front door takes them: the one place that says which
values are acceptable, in what form the queue file keeps them, and what a client hears when
one is not.

RET and ENVID come with MAIL, NOTIFY and ORCPT with RCPT. A bad value is refused with `501 5.5.4`
and the reason, a parameter given twice too; a DSN parameter with the other command (NOTIFY at
MAIL), or on a server that does not offer DSN, is not recognized: `555 5.5.4`. The aiosmtpd front
door (router/front/aiosmtpd.py, DSNServer) calls `take`; the qpsmtpd plugin has a copy of these
rules and these replies in Perl (packaging/qpsmtpd/queue/router, `dsn_problem`), and a test runs
both against the same commands.

The queue file keeps RET and NOTIFY upper case, ENVID and ORCPT xtext-decoded
(`rfc822;user@example.org`), as docs/queue-format.md says: the report quotes them decoded, and
the SMTP client encodes them again for the next hop.
"""

from __future__ import annotations

import re

MAIL_PARAMETERS = ("RET", "ENVID")
RCPT_PARAMETERS = ("NOTIFY", "ORCPT")
NOTIFY = re.compile(r"NEVER|(?:SUCCESS|FAILURE|DELAY)(?:,(?:SUCCESS|FAILURE|DELAY))*")
MAX_ENVID = 100  # characters of the xtext, RFC 3461 4.4
MAX_ORCPT = 500  # characters of the whole value, RFC 3461 4.2
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*")  # RFC 3461 4: "+" and "=" only as +HH
_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")


class DSNParameterError(ValueError):
    """A DSN parameter a front door refuses; `reply` is the whole SMTP reply, code first."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def take(name: str, value: str) -> str:
    """The value of DSN parameter `name` (upper case) as the queue file keeps it, or
    DSNParameterError with the 501 reply that says what is wrong with it."""
    if name == "RET":
        if value.upper() not in ("FULL", "HDRS"):
            raise _bad(name, "is FULL or HDRS")
        return value.upper()
    if name == "NOTIFY":
        if not NOTIFY.fullmatch(value.upper()):
            raise _bad(name, "is NEVER alone, or a list of SUCCESS, FAILURE and DELAY")
        return value.upper()
    if name == "ENVID":
        if len(value) > MAX_ENVID:
            raise _bad(name, f"is at most {MAX_ENVID} characters")
        return _decoded(name, value)
    if name == "ORCPT":
        kind, separator, address = value.partition(";")
        if len(value) > MAX_ORCPT:
            raise _bad(name, f"is at most {MAX_ORCPT} characters")
        if not separator or not _ADDR_TYPE.fullmatch(kind) or not address:
            raise _bad(name, "is an address type, ';' and the address (rfc822;user@example.org)")
        return f"{kind};{_decoded(name, address)}"
    raise ValueError(f"{name} is not a DSN parameter")


def twice(name: str) -> DSNParameterError:
    """The refusal of a command that gives `name` more than once."""
    return DSNParameterError(f"501 5.5.4 {name} parameter given twice")


def _decoded(name: str, value: str) -> str:
    """xtext decoded; printable ASCII and space only, as a header line and a report hold it."""
    if not value or not _XTEXT.fullmatch(value):
        raise _bad(name, "is xtext: printable ASCII, with '+', '=' and others as +HH")
    text = _HEXCHAR.sub(lambda m: chr(int(m[1], 16)), value)
    if not _PRINTABLE.fullmatch(text):
        raise _bad(name, "encodes a control or non-ASCII character")
    return text


def _bad(name: str, rule: str) -> DSNParameterError:
    return DSNParameterError(f"501 5.5.4 Bad {name} parameter: it {rule}")
