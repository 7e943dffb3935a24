"""The tokens of an RFC 5322 address list (To:, Cc:, From:, and sendmail's recipients), for
the two readers of such lists: the sendmail front door, which takes the addresses out
(router/front/sendmail.py), and the rewriting of header addresses, which needs to know where
each domain stands (policy/rewriting.py). Every token keeps its offsets in the text, so a reader
can copy the text as it was written; white space, folding and comments are no tokens.

Anything the grammar has no place for (a stray `)`, `]` or `\\`, a control character, a quoted
string, literal or comment left open) raises AddressListError: neither reader guesses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ATOM, QUOTED, LITERAL = "atom", "quoted", "literal"  # the other kinds are the special character itself
WORDS = (ATOM, QUOTED, ".")  # what a phrase or a local part is made of
_WSP = " \t\r\n"
_SPECIALS = "<>:;@,."
_ATOM_END = re.compile(r'[\x00-\x20\x7f()<>\[\]:;@\\,."]')


class AddressListError(ValueError):
    """The text is not an address list; the message says what is out of place."""


@dataclass(frozen=True)
class Token:
    kind: str  # ATOM, QUOTED, LITERAL or one of <>:;@,.
    start: int
    end: int


def tokens(text: str) -> list[Token]:
    """The tokens of `text` that matter to the grammar, in order."""
    found = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _WSP:
            i += 1
        elif c == "(":
            i = _comment_end(text, i)
        elif c == '"':
            end = _close(text, i + 1, '"', "")
            found.append(Token(QUOTED, i, end))
            i = end
        elif c == "[":
            end = _close(text, i + 1, "]", "[")
            found.append(Token(LITERAL, i, end))
            i = end
        elif c in _SPECIALS:
            found.append(Token(c, i, i + 1))
            i += 1
        elif c in ")]\\" or ord(c) < 0x20 or c == "\x7f":
            raise AddressListError(f"{c!r} out of place")
        else:
            match = _ATOM_END.search(text, i)
            end = match.start() if match else n
            found.append(Token(ATOM, i, end))
            i = end
    return found


def _comment_end(text: str, i: int) -> int:
    """The offset after the comment opening at `i`; comments nest, `\\` quotes one character."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        depth += {"(": 1, ")": -1}.get(c, 0)
        i += 1
        if depth == 0:
            return i
    raise AddressListError("'(' without ')'")


def _close(text: str, i: int, closer: str, forbidden: str) -> int:
    """The offset after `closer`, searching from `i` past quoted pairs."""
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
        elif c == closer:
            return i + 1
        elif c in forbidden:
            break
        else:
            i += 1
    opener = "[" if closer == "]" else closer
    raise AddressListError(f"{opener!r} without {closer!r}")
