"""The replies of an SMTP or LMTP server, and the ones the client makes up in their place.

A reply is parsed once into a Reply that says what it means for a recipient (sent, deferred,
bounced) and how to quote it in a log line or a bounce, as Postfix words them; the client
(workers/smtp_client.py) reads the bytes, this module judges them. Kept apart from the session
so that what a reply means can be read without the sockets around it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from router.spool.queue_file import clean
from workers.transport import BOUNCED, DEFERRED, SENT

GREETING = "greeting"  # the `command` of the server's first reply, which answers no command
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?: +|$)")


@dataclass(frozen=True)
class Reply:
    """One answer for a recipient or a command: the server's words, or ours (`local`) when the
    server could not give one (timeout, lost connection) or was never asked (SIZE, SMTPUTF8).

    `unsent` marks a recipient left out of the transaction because the server's recipient limit
    was reached (452 too many recipients): not refused, and fit for a new transaction at once.
    `derived` says the server gave no enhanced status code and `dsn` was derived from `code`:
    it is then left out of the reply as quoted, which keeps the server's words verbatim.
    `lines` keeps the raw text of each line (EHLO keywords live there).
    """

    code: int
    dsn: str
    text: str
    command: str = ""
    local: bool = False
    unsent: bool = False
    derived: bool = False
    lines: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def status(self) -> str:
        """sent, deferred or bounced, as workers.transport names them; anything odd defers."""
        kind = self.code // 100
        return SENT if kind == 2 else BOUNCED if kind == 5 else DEFERRED

    @property
    def ok(self) -> bool:
        return self.code // 100 == 2

    def __str__(self) -> str:
        if self.local:
            return self.text
        quoted = self.text if self.derived else f"{self.dsn} {self.text}"
        return f"{self.code} {quoted}".rstrip()

    def describe(self, peer: str) -> str:
        """The reply as a log line or bounce reason, the way Postfix words it."""
        if self.local:
            return self.text
        said = f"host {peer} said: {self}"
        return said if self.command in ("", GREETING) else f"{said} (in reply to {self.command} command)"


def local_reply(code: int, dsn: str, text: str, what: str = "") -> Reply:
    """Our own answer where the server gave none (or was never asked): quoted as `text` alone."""
    return Reply(code, dsn, text, what, local=True)


def extensions(lines: Sequence[str]) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters; the old `AUTH=` form counts as AUTH."""
    found: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            keyword, params = "AUTH", f"{keyword[5:]} {params}"
        if keyword == "AUTH" and keyword in found:
            params = f"{found[keyword]} {params}"
        if keyword:
            found[keyword] = params.strip()
    return found


_KNOWN: dict[tuple[tuple[bytes, ...], str], Reply] = {}
KNOWN_REPLIES = 256


def known_reply(lines: list[bytes], what: str) -> Reply:
    """_parse_reply, remembered: a server answers MAIL, RCPT, DATA and RSET with the same bytes
    message after message, and a Reply is immutable, so one parse serves them all."""
    key = (tuple(lines), what)
    reply = _KNOWN.get(key)
    if reply is None:
        if len(_KNOWN) >= KNOWN_REPLIES:
            _KNOWN.clear()
        reply = _KNOWN[key] = _parse_reply(lines, what)
    return reply


def _parse_reply(lines: list[bytes], what: str) -> Reply:
    """Code, enhanced status code (RFC 3463; derived from the code when absent) and the text
    of all lines joined by spaces, for logs."""
    code = int(lines[0][:3])
    raw = tuple(reply_text(line[4:]) for line in lines)
    dsn = ""
    texts = []
    for text in raw:
        match = _ENHANCED.match(text)
        if match and match[1] == str(code)[0]:
            dsn = dsn or match[0].strip()
            text = text[match.end():]
        if text.strip():
            texts.append(text.strip())
    return Reply(code, dsn or f"{code // 100}.0.0", " ".join(texts), what, derived=not dsn, lines=raw)


def too_many(reply: Reply) -> bool:
    """RFC 5321 4.5.3.1.10: 452 (or the old 552) for the recipient limit, not for a full mailbox."""
    if reply.code == 452:
        return reply.dsn in ("4.5.3", "4.0.0") or "too many" in reply.text.lower()
    return reply.code == 552 and reply.dsn == "5.5.3"


def reply_text(raw: bytes) -> str:
    """A line from the server as text safe to log and to write into a queue file."""
    return clean(raw.decode("utf-8", "replace"))
