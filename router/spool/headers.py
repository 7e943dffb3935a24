"""RFC 5322 message headers: where a header ends, its fields (folded lines unfolded), one field
looked up, fields put in front of a message. The front doors, the reports, the delivery fields,
the log lines and the rewriting of header addresses read headers through it; it imports nothing
of the project, so any layer may use it.

The header ends at the first empty line; a message that begins with one has an empty header. A
line before it that is neither a field nor a continuation line (an mbox `From ` line, a stray
line) is no field, nor are continuation lines after it: they are passed over and kept as they
are, and the fields after them are still fields (a Bcc: there is still taken out).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

LINE = re.compile(rb"[^\n]*\n|[^\n]+")  # one line, its line end included
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_HEADER_END = re.compile(rb"(?:^|\n)\r?\n")


@dataclass
class HeaderField:
    name: str  # lower case
    first: int  # index of its first line
    end: int  # index after its last continuation line
    colon_end: int  # offset in its first line just after the colon
    value: str  # unfolded, decoded as UTF-8 (undecodable bytes kept as surrogates)


def header_fields(lines: list[bytes]) -> list[HeaderField]:
    """The fields of the header that `lines` begin with; it ends at the first empty line."""
    fields: list[HeaderField] = []
    current: HeaderField | None = None
    raw: list[bytes] = []
    for index, line in enumerate(lines):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                raw.append(line)
                current.end = index + 1
            continue
        if current is not None:
            current.value = _unfold(raw)
        if line in (b"\n", b"\r\n"):
            return fields
        match = _FIELD_NAME.match(line)
        current = None if match is None else HeaderField(match.group(1).decode("ascii").lower(), index, index + 1,
                                                         match.end(), "")
        if current is not None:
            fields.append(current)
            raw = [line[match.end():]]
    if current is not None:
        current.value = _unfold(raw)
    return fields


def header_of(message: bytes) -> bytes:
    """A message's header with the empty line that ends it; the whole message if it has none."""
    end = _HEADER_END.search(message)
    return message[:end.end()] if end else message


def message_fields(message: bytes) -> list[HeaderField]:
    """The fields of a whole message's header."""
    return header_fields(LINE.findall(header_of(message)))


def first_field(message: bytes, name: str) -> str | None:
    """The value of the message's first `name` field (any case), unfolded as header_fields
    unfolds it; None without one. For one field of every message, without taking the others apart."""
    found = _field_pattern(name).search(header_of(message))
    return None if found is None else _unfold([found.group(1)])


@functools.cache
def _field_pattern(name: str) -> re.Pattern[bytes]:
    """A field named `name` at the start of a line, and its continuation lines."""
    return re.compile(rb"^" + re.escape(name.encode("ascii")) + rb"[ \t]*:([^\n]*\n?(?:[ \t][^\n]*\n?)*)",
                      re.IGNORECASE | re.MULTILINE)


def _unfold(raw: list[bytes]) -> str:
    text = b"".join(raw).decode("utf-8", "surrogateescape")
    return _FOLD.sub("", text).strip(" \t\r\n")


def prepend_fields(message: bytes, fields: list[str]) -> bytes:
    """`fields` ("Name: value", folded with "\\n") put before the message, in the line ending its
    first line uses (LF or CRLF). The message follows byte for byte; when it has no header at
    all, an empty line comes first, so that its first line stays the body's."""
    newline = b"\r\n" if re.match(rb"[^\n]*\r\n", message) else b"\n"
    added = b"".join(f.encode("utf-8", "surrogateescape").replace(b"\n", newline) + newline for f in fields)
    if message[:1] not in (b"\n", b"\r") and not _FIELD_NAME.match(message):
        added += newline
    return added + message
