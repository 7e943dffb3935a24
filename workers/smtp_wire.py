"""What a message becomes on the wire: the bytes that follow a 354, or go in a BDAT chunk.

A message is spooled as it came, with LF or CRLF line ends; the wire wants CRLF everywhere.
DATA (RFC 5321 4.5.2) ends at a line with a single dot, so every line that starts with one is
dot-stuffed, and a line may hold at most 998 octets before its CRLF (RFC 5321 4.5.3.1.6): a strict
server refuses the whole message for one longer line, so such lines are wrapped (header lines
folded, body lines split) as Postfix does. A long line, a bare CR and a NUL are what DATA may not
carry; BDAT, whose chunk is counted rather than ended by a dot, can: when the server offers
BINARYMIME (RFC 3030) too, a message with any of them goes unwrapped, declared BODY=BINARYMIME.
Eight-bit bytes are never changed; the client declares BODY=8BITMIME (RFC 6152) for them where the
server offers it.
"""

from __future__ import annotations

import re

MAX_TEXT_LINE = 998  # octets of a message line before its CRLF (RFC 5321 4.5.3.1.6)
# A line too long for the wire, past the first line: its literal first byte lets re skip ahead
# with a fast scan, which keeps the check for the common case (none) cheaper than the CRLF pass.
_LONG_LINE = re.compile(rb"\n[^\n]{%d}" % (MAX_TEXT_LINE + 1))
_HEADER_LINE = re.compile(rb"[!-9;-~]+:|[ \t]")  # a field name and colon, or a folded continuation


def body(message: bytes, binarymime: bool) -> tuple[bytes, bool]:
    """The message as it goes to the server (before any dot-stuffing), and whether it goes as
    BODY=BINARYMIME. Every line end (LF or CRLF) as CRLF, and one after a last line that lacks
    it. A CR not before an LF, and a NUL, are data and stay, so binary content goes through
    unchanged otherwise. A line too long for DATA is wrapped (wrap_long_lines) unless the server
    takes BINARYMIME (`binarymime`, with BDAT): a message with such a line, a bare CR or a NUL,
    none of which DATA may carry, then goes as it is, declared BINARYMIME (RFC 3030)."""
    data = message.replace(b"\r\n", b"\n")
    long = _has_long_line(data)
    binary = binarymime and (long or b"\r" in data or b"\0" in data)  # every CR left is a bare one
    if long and not binary:
        data = wrap_long_lines(data)
    data = data.replace(b"\n", b"\r\n")
    return (data + b"\r\n" if data and not data.endswith(b"\r\n") else data), binary


def _has_long_line(data: bytes) -> bool:
    """Whether a line of LF-ended `data` is longer than MAX_TEXT_LINE: the first line by a find
    bounded to its first MAX_TEXT_LINE + 1 bytes, the others by one search (see _LONG_LINE)."""
    first_is_long = len(data) > MAX_TEXT_LINE and data.find(b"\n", 0, MAX_TEXT_LINE + 1) < 0
    return first_is_long or _LONG_LINE.search(data) is not None


def wrap_long_lines(data: bytes) -> bytes:
    """Every line of LF-ended `data` longer than MAX_TEXT_LINE wrapped, as Postfix's
    smtp_line_length_limit does: a strict server refuses the whole message for one such line
    (500), which would return mail that can be delivered. Header lines (up to the first line
    that is empty or not a header line) are folded, so that unfolding gives the field back
    (_fold); body lines are split into pieces of MAX_TEXT_LINE octets."""
    lines = data.split(b"\n")
    in_header = True
    for index, line in enumerate(lines):
        in_header = in_header and _HEADER_LINE.match(line) is not None
        if len(line) > MAX_TEXT_LINE:
            lines[index] = _fold(line) if in_header else _split(line)
    return b"\n".join(lines)


def _fold(line: bytes) -> bytes:
    """A header line folded (RFC 5322 2.2.3) into lines of at most MAX_TEXT_LINE octets: before
    white space where there is some, so unfolding restores it exactly; else at the limit, with a
    space added to start the continuation line."""
    pieces = []
    while len(line) > MAX_TEXT_LINE:
        cut = _fold_point(line)
        pieces.append(line[:cut])
        line = line[cut:] if line[cut:cut + 1] in (b" ", b"\t") else b" " + line[cut:]
    pieces.append(line)
    return b"\n".join(pieces)


def _fold_point(line: bytes) -> int:
    """The last white space within the limit that has text before it (a line of white space
    alone is not a folded line), else the limit itself."""
    text_starts = len(line) - len(line.lstrip(b" \t"))
    end = MAX_TEXT_LINE + 1
    cut = max(line.rfind(b" ", text_starts + 1, end), line.rfind(b"\t", text_starts + 1, end))
    return cut if cut > 0 else MAX_TEXT_LINE


def _split(line: bytes) -> bytes:
    """A body line as lines of MAX_TEXT_LINE octets, the last one shorter."""
    return b"\n".join(line[start:start + MAX_TEXT_LINE] for start in range(0, len(line), MAX_TEXT_LINE))


def stuff(data: bytes) -> bytes:
    """Dot-stuffing (RFC 5321 4.5.2) of CRLF-ended data, and the terminating dot line."""
    data = data.replace(b"\r\n.", b"\r\n..")
    return (b"." + data if data.startswith(b".") else data) + b".\r\n"


def wire_data(message: bytes) -> bytes:
    """Exactly what follows a 354: the message with CRLF line ends, dot-stuffed, terminated."""
    return stuff(body(message, binarymime=False)[0])
