"""Address rewriting: the `rewriting FILE` rules, applied to envelope addresses and, with
`rewrite-both`, to the From:, To: and Cc: header fields.

The file holds one rule a line, `direction old new`; comments and line ends are those of every
policy file (policy/policy_file.py: `#` at the start of a line or after white space):

    from  *.servers.company.foo  company.foo    # any subdomain, not the domain itself
    to    /.*\\.foo\\.bar/         foo.bar        # a regex, case-insensitive, whole domain
    both  old.example            new.example    # that domain only

`from` rules rewrite the envelope sender and From:, `to` rules the envelope recipients, To: and
Cc:, `both` rules all of them. For each address the first matching rule, top to bottom, wins,
and only the domain changes: the local part stays byte for byte. Domains compare without regard
to case and IDNA-aware, so `bücher.example` and `xn--bcher-kva.example` are the same domain;
`new` goes into the address as the rule spells it.

Header rewriting works on the raw bytes with a tokenizer of its own for RFC 5322 address lists
rather than with the email package, which would refold and re-encode the fields it touches: here
each rewritten domain is replaced where it stands and every other byte of the message is kept.
A field that does not parse is left as it is.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise

from policy.policy_file import Problems, read_bytes, split_lines
from policy.transport_map import compile_regex
from router.spool.address import AddressError, check_domain
from router.spool.address_list import ATOM, LITERAL, WORDS, AddressListError, Token, tokens
from router.spool.headers import LINE, header_fields, header_of

FROM, TO, BOTH = "from", "to", "both"
DIRECTIONS = (FROM, TO, BOTH)
DOMAIN, WILDCARD, REGEX = "domain", "wildcard", "regex"

_USAGE = "a rule is 'direction old new'"


class RewritingError(ValueError):
    """A rewriting file that cannot be used; the message starts with `FILE:LINE: `."""


# -- domains ---------------------------------------------------------------------------------


def _unicode_label(label: str) -> str:
    """One label in the form rules compare: the U-label of an A-label, lower case, NFC."""
    label = label.lower()
    if label.startswith("xn--") and label.isascii():
        try:
            label = label[4:].encode("ascii").decode("punycode")
        except (UnicodeError, ValueError, OverflowError):
            pass  # not a real A-label: compared as written
    return unicodedata.normalize("NFC", label).lower()


def _ascii_label(label: str) -> str:
    """One label as an A-label, so a regex written against `xn--` forms still matches."""
    label = _unicode_label(label)
    if label.isascii():
        return label
    try:
        return "xn--" + label.encode("punycode").decode("ascii")
    except (UnicodeError, ValueError, OverflowError):
        return label


def _domain_key(domain: str) -> str:
    """The form in which two domains are equal when they name the same domain: case folded,
    A-labels decoded to U-labels, so a rule written either way matches both forms."""
    if domain.startswith("["):
        return domain.lower()
    return ".".join(_unicode_label(label) for label in domain.split("."))


def _domain_forms(domain: str) -> set[str]:
    """The spellings a regex is tried against: as written, all U-labels, all A-labels."""
    if domain.startswith("["):
        return {domain}
    labels = domain.split(".")
    return {domain, ".".join(map(_unicode_label, labels)), ".".join(map(_ascii_label, labels))}


def _domain_problem(domain: str) -> str | None:
    """Why `domain` is not a host name or address literal, worded to follow the domain."""
    if not domain:
        return "is empty"
    try:
        check_domain(domain, domain)
    except AddressError as exc:
        return str(exc).replace(f"domain of {domain!r} ", "")
    return None


# -- rules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One line of the file; it knows where it was written, to explain a rewrite."""

    source: str
    line: int
    direction: str
    old: str
    new: str
    kind: str
    key: str = field(default="", repr=False, compare=False)
    regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.direction} {self.old} {self.new}"

    def applies_to(self, direction: str) -> bool:
        return self.direction in (direction, BOTH)

    def matches(self, domain: str) -> bool:
        """Whether this rule's `old` covers `domain`. A regex is tried on the domain as written
        and with all labels as U-labels and as A-labels, so it need not guess the form mail uses."""
        if self.regex is not None:
            return any(self.regex.fullmatch(form) for form in _domain_forms(domain))
        key = _domain_key(domain)
        if self.kind == WILDCARD:
            return key.endswith("." + self.key) and len(key) > len(self.key) + 1
        return key == self.key


def _parse_rule(text: str, source: str, line: int) -> Rule:
    """The rule on one line of a file, its comment already removed."""
    where = f"{source}:{line}"
    fields = text.split()
    if len(fields) < 3:
        missing = "new domain" if len(fields) == 2 else "old and new domains"
        raise RewritingError(f"{where}: missing {missing} ({_USAGE})")
    if len(fields) > 3:
        raise RewritingError(f"{where}: unexpected {' '.join(fields[3:])!r} after the new domain ({_USAGE})")
    direction, old, new = fields
    if direction not in DIRECTIONS:
        raise RewritingError(f"{where}: unknown direction {direction!r} (known: from, to, both)")
    problem = _domain_problem(new)
    if problem:
        raise RewritingError(f"{where}: new domain {new!r} {problem}")
    if old.startswith("/"):
        return Rule(source, line, direction, old, new, REGEX, regex=_compile(old, where))
    if old.startswith("*."):
        domain = old[2:]
        problem = _domain_problem(domain)
        if problem is None and domain.startswith("["):
            problem = "is an address literal, which has no subdomains"
        if problem:
            raise RewritingError(f"{where}: wildcard {old!r}: {domain!r} {problem}")
        return Rule(source, line, direction, old, new, WILDCARD, key=_domain_key(domain))
    if "*" in old:
        raise RewritingError(f"{where}: wildcard {old!r}: a wildcard is '*.' and a domain, e.g. *.example.org")
    problem = _domain_problem(old)
    if problem:
        raise RewritingError(f"{where}: old domain {old!r} {problem}")
    return Rule(source, line, direction, old, new, DOMAIN, key=_domain_key(old))


def _compile(old: str, where: str) -> re.Pattern[str]:
    if len(old) < 2 or not old.endswith("/"):
        raise RewritingError(f"{where}: regex {old!r} does not end with '/' (write /regex/)")
    if old == "//":
        raise RewritingError(f"{where}: empty regex '//'")
    return compile_regex(old[1:-1], old, where, RewritingError)


def parse_rewriting(text: bytes | str, source: str) -> Rewriter:
    """The rules in `text`, read as the file `source` (which names every error)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    rules = []
    problems = Problems(RewritingError)
    for number, line in split_lines(data, source, RewritingError):
        with problems.collecting():
            rules.append(_parse_rule(line, source, number))
    problems.check()
    return Rewriter(rules)


def load_rewriting(path: str) -> Rewriter:
    """The rules of a rewriting file; errors start with `path:line: `."""
    return parse_rewriting(read_bytes(path, RewritingError, what="rewriting rules"), path)


# -- rewriting -------------------------------------------------------------------------------


class Rewriter:
    """The rules of one file in order; `Rewriter()` has none and changes nothing."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules = tuple(rules)
        self._directions = {d for d in (FROM, TO) if any(r.applies_to(d) for r in self.rules)}

    def rule_for(self, direction: str, domain: str) -> Rule | None:
        """The first rule for `direction` ("from" or "to") that matches `domain`."""
        if direction not in (FROM, TO):
            raise ValueError(f"direction must be 'from' or 'to', not {direction!r}")
        for rule in self.rules:
            if rule.applies_to(direction) and rule.matches(domain):
                return rule
        return None

    def rewrite(self, direction: str, address: str) -> tuple[str, Rule | None]:
        """An envelope address (`local@domain`) rewritten, and the rule that did it (None if
        none matched). The null sender and addresses without a domain stay as they are."""
        local, at, domain = address.rpartition("@")
        rule = self.rule_for(direction, domain) if at and domain else None
        return (address, None) if rule is None else (f"{local}@{rule.new}", rule)

    def rewrite_headers(self, message: bytes) -> bytes:
        """`message` with the domains in its From:, To: and Cc: fields rewritten; every other
        byte, the body included, is kept. Fields that do not parse stay as they are."""
        if not self._directions:
            return message
        lines = LINE.findall(header_of(message))
        header_end = sum(map(len, lines))
        changed = False
        for found in header_fields(lines):
            direction = _FIELD_DIRECTION.get(found.name)
            if direction in self._directions:
                raw = b"".join(lines[found.first:found.end])
                new = self._rewrite_field(direction, raw, found.colon_end)
                if new != raw:
                    lines[found.first:found.end] = [new] + [b""] * (found.end - found.first - 1)
                    changed = True
        return b"".join(lines) + message[header_end:] if changed else message

    def _rewrite_field(self, direction: str, raw: bytes, colon_end: int) -> bytes:
        """One whole field, name included, with the domains of its addresses rewritten."""
        value = raw[colon_end:].decode("utf-8", "surrogateescape")
        spans = _address_domains(value)
        if not spans:
            return raw
        pieces = []
        last = 0  # end of the text already copied into pieces
        for start, stop in spans:
            domain = value[start:stop]
            if not _rewritable(domain):
                continue
            rule = self.rule_for(direction, domain)
            if rule is not None:
                pieces += [value[last:start], rule.new]
                last = stop
        if not pieces:
            return raw
        pieces.append(value[last:])
        return raw[:colon_end] + "".join(pieces).encode("utf-8", "surrogateescape")


_FIELD_DIRECTION = {"from": FROM, "to": TO, "cc": TO}
_SURROGATE = re.compile("[\udc80-\udcff]")


def _rewritable(domain: str) -> bool:
    """Bytes that were not UTF-8 are never a domain a rule should touch."""
    return not _SURROGATE.search(domain)


# -- RFC 5322 address lists (their tokens: router/spool/address_list.py) ------------------------


def _address_domains(value: str) -> list[tuple[int, int]]:
    """(start, end) of the domain of every address in an address list, in order; none if the
    list does not parse. A domain with white space or comments inside is not reported, as
    replacing it would drop what stands between its parts."""
    try:
        return _Parser(tokens(value)).address_list()
    except AddressListError:
        return []


class _Parser:
    """RFC 5322 section 3.4 with the obsolete forms of section 4.4 that mail still carries
    (empty list elements, phrases with dots, routes in angle brackets, CFWS around dots)."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.at = 0
        self.domains: list[tuple[int, int]] = []

    def peek(self) -> str:
        return self.tokens[self.at].kind if self.at < len(self.tokens) else ""

    def take(self, kind: str) -> Token:
        if self.peek() != kind:
            raise AddressListError(f"expected {kind!r}, found {self.peek()!r}")
        self.at += 1
        return self.tokens[self.at - 1]

    def address_list(self) -> list[tuple[int, int]]:
        while self.peek():
            if self.peek() != ",":
                self.address(group_allowed=True)
                if self.peek():
                    self.take(",")
            else:
                self.at += 1
        return self.domains

    def address(self, group_allowed: bool) -> None:
        """A mailbox (`addr-spec`, `[phrase] <addr-spec>`) or, at the top, a group."""
        words = self.words()
        after = self.peek()
        if after == "@":
            self.check_local_part(words)
            self.at += 1
            self.domain()
        elif after == "<":
            if words and words[0].kind == ".":
                raise AddressListError("phrase starts with a dot")
            self.angle_addr()
        elif after == ":" and group_allowed and words and words[0].kind != ".":
            self.at += 1
            self.group_list()
        else:
            raise AddressListError(f"no address before {after!r}")

    def group_list(self) -> None:
        while self.peek() != ";":
            if self.peek() == ",":
                self.at += 1
                continue
            self.address(group_allowed=False)
            if self.peek() != ";":
                self.take(",")
        self.at += 1

    def angle_addr(self) -> None:
        self.take("<")
        if self.peek() == "@":  # obs-route: routing hints, not addresses, so never rewritten
            while self.peek() in ("@", ","):
                if self.take(self.peek()).kind == "@":
                    self.domain(record=False)
            self.take(":")
        self.check_local_part(self.words())
        self.take("@")
        self.domain()
        self.take(">")

    def words(self) -> list[Token]:
        start = self.at
        while self.peek() in WORDS:
            self.at += 1
        return self.tokens[start:self.at]

    def check_local_part(self, words: list[Token]) -> None:
        """word *("." word): the words of a local part alternate with dots."""
        if len(words) % 2 == 0 or any((t.kind == ".") != (i % 2 == 1) for i, t in enumerate(words)):
            raise AddressListError("not a local part")

    def domain(self, record: bool = True) -> None:
        """A domain literal or atoms joined by dots; recorded if its tokens touch."""
        if self.peek() == LITERAL:
            parts = [self.take(LITERAL)]
        else:
            parts = [self.take(ATOM)]
            while self.peek() == "." and self.at + 1 < len(self.tokens) and self.tokens[self.at + 1].kind == ATOM:
                parts += self.tokens[self.at:self.at + 2]
                self.at += 2
        if record and all(a.end == b.start for a, b in pairwise(parts)):
            self.domains.append((parts[0].start, parts[-1].end))
