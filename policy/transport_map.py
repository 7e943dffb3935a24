"""The transport policy file: which next hop a recipient goes to, by domain, wildcard, regex or
address, first matching rule winning.

    # destination           next hop
    user@foo.bar            queue/maildir /var/mail/special
    foo.bar                 mx.foo.bar:2525
    *.foo                   [10.1.1.1]
    /.*spl-[0-9]{6}\\.foo\\.bar/  $splunkmta

Lines and comments are read as in every policy file (policy/policy_file.py). Rules are kept in
a PatternIndex: hashes (addresses, domains, wildcard suffixes) plus a list of compiled regexes,
and every rule remembers its line: a lookup takes the matching rule with the lowest line number,
so first-match order holds without scanning thousands of plain domain rules per recipient. The
destinations file (policy/destinations.py) writes its patterns the same way and finds them with
the same index.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from policy.next_hop import NextHop, NextHopError, parse_next_hop
from policy.policy_file import Problems, read_lines
from router.spool.address import AddressError, check_domain, parse_path, split_address

_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
T = TypeVar("T")


class PolicyError(ValueError):
    """A policy file that cannot be used; the text starts with FILE:LINE."""


def compile_regex(regex: str, shown: str, where: str, error: type[ValueError] = PolicyError) -> re.Pattern[str]:
    """`regex` compiled case-insensitively, or `error` saying `where: bad regex SHOWN: why`.

    Every policy file that takes regexes compiles them here, so a hostile one is refused like any
    other bad line instead of ending a reload: besides re.error, re.compile raises OverflowError
    (a repeat count or character code too large for it), RecursionError (groups nested about 500
    deep) and ValueError (clashing flags, a repeat count of thousands of digits). A set that re
    only warns about (FutureWarning) is refused too: `[[:alpha:]]`, a POSIX class that a table
    written for Postfix may hold, would otherwise match `[`, `:` and the letters of "alpha".
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            return re.compile(regex, re.IGNORECASE)
    except (re.error, OverflowError, RecursionError, ValueError, FutureWarning) as exc:
        raise error(f"{where}: bad regex {shown}: {_regex_problem(exc)}") from None


def _regex_problem(exc: Exception) -> str:
    """What is wrong with a regex, in words for whoever wrote it rather than for a programmer."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, FutureWarning):  # re's words, e.g. "Possible nested set at position 1"
        said = f"{str(exc)[:1].lower()}{str(exc)[1:]}"
        if "nested set" in said:
            return (f"{said}: a POSIX class such as [[:alpha:]] is not supported (write [a-z] or \\d); "
                    "escape a [ meant literally")
        return f"{said}: escape the doubled character if it is meant literally"
    # int() refuses over 4,300 digits with advice to call sys.set_int_max_str_digits()
    if isinstance(exc, OverflowError) or "integer string conversion" in str(exc):
        return "a repeat count or character code is too large"
    return str(exc)


@dataclass(frozen=True)
class Rule:
    destination: str
    next_hop: NextHop
    where: str  # FILE:LINE, for errors and for `qrouter route`
    position: int
    pattern: re.Pattern[str] | None = field(default=None, repr=False, compare=False)  # of a /regex/ rule


def normalize_domain(domain: str) -> str:
    """The form domains are compared in: lower case, A-labels (so a U-label rule and an
    A-label address meet)."""
    domain = domain.lower().rstrip(".")
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def normalize_address(address: str) -> str:
    local, domain = split_address(address)
    return f"{local.lower()}@{normalize_domain(domain)}"


class PatternIndex(Generic[T]):
    """Rules found by pattern, the first in file order winning, whatever kind of pattern it is:
    exact names in one hash (keyed by what they name: an address, a domain...), `*.domain`
    wildcards by their suffix, and a list of compiled regexes. A lookup takes the lowest-placed
    rule among the hash hits, then tries only the regexes placed before it, so first-match order
    holds without scanning thousands of plain rules per lookup. Callers normalize the names they
    add and look up (normalize_domain, normalize_address)."""

    def __init__(self) -> None:
        self._exact: dict[tuple[str, str], tuple[int, T]] = {}
        self._wildcards: dict[str, tuple[int, T]] = {}
        self._regexes: list[tuple[re.Pattern[str], int, T]] = []

    def add_exact(self, kind: str, name: str, position: int, rule: T) -> None:
        self._exact.setdefault((kind, name), (position, rule))

    def add_wildcard(self, suffix: str, position: int, rule: T) -> None:
        """A rule for every domain under `suffix` (of `*.suffix`), not `suffix` itself."""
        self._wildcards.setdefault(suffix, (position, rule))

    def add_regex(self, pattern: re.Pattern[str], position: int, rule: T) -> None:
        self._regexes.append((pattern, position, rule))

    def first(self, names: Iterable[tuple[str, str | None]], domain: str | None, subject: str | None) -> T | None:
        """The first rule in file order that names one of `names` ((kind, name); a None name is
        skipped), has a wildcard over `domain`, or has a regex matching all of `subject`."""
        best: tuple[int, T] | None = None
        candidates = [self._exact.get((kind, name)) for kind, name in names if name is not None]
        if domain is not None:
            labels = domain.split(".")
            candidates += [self._wildcards.get(".".join(labels[i:])) for i in range(1, len(labels))]
        for candidate in candidates:
            if candidate is not None and (best is None or candidate[0] < best[0]):
                best = candidate
        if subject is not None:
            for pattern, position, rule in self._regexes:
                if best is not None and position > best[0]:
                    break
                if pattern.fullmatch(subject):
                    return rule
        return best[1] if best is not None else None


ADDRESS, DOMAIN = "address", "domain"  # kinds of exact names in a PatternIndex


class TransportMap:
    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self._index: PatternIndex[Rule] = PatternIndex()
        for rule in rules:
            text = rule.destination
            if rule.pattern is not None:
                self._index.add_regex(rule.pattern, rule.position, rule)
            elif text.startswith("*."):
                self._index.add_wildcard(normalize_domain(text[2:]), rule.position, rule)
            elif "@" in text:
                self._index.add_exact(ADDRESS, normalize_address(text), rule.position, rule)
            else:
                self._index.add_exact(DOMAIN, normalize_domain(text), rule.position, rule)

    def lookup(self, address: str) -> Rule | None:
        """The first rule, in file order, that matches `address` (a regex: the whole address)."""
        domain = normalize_domain(split_address(address)[1])
        return self._index.first([(ADDRESS, normalize_address(address)), (DOMAIN, domain)], domain, address)


def load_definitions(path: str) -> dict[str, str]:
    """The transport-defs file: `name value` a line, for `$name` in the transports file."""
    definitions: dict[str, str] = {}
    problems = Problems(PolicyError)
    for where, line in file_lines(path):
        with problems.collecting():
            name, _, value = line.partition(" ")
            if not _NAME.fullmatch(name):
                raise PolicyError(f"{where}: {name!r} is not a variable name (letters, digits, _)")
            if not value.strip():
                raise PolicyError(f"{where}: variable {name} has no value")
            if name in definitions:
                raise PolicyError(f"{where}: variable {name} is defined twice")
            definitions[name] = value.strip()
    problems.check()
    return definitions


def load_transport_map(path: str, definitions: dict[str, str], defs_path: str = "") -> TransportMap:
    base_dir = os.path.dirname(os.path.abspath(path))
    rules = []
    problems = Problems(PolicyError)
    for position, (where, line) in enumerate(file_lines(path)):
        with problems.collecting():
            line = _substitute(line, definitions, where, defs_path)
            destination, hop_text = split_rule(line, where)
            pattern = check_pattern(destination, where)
            try:
                next_hop = parse_next_hop(hop_text, base_dir)
            except NextHopError as exc:
                raise PolicyError(f"{where}: next hop {hop_text!r}: {exc}") from None
            rules.append(Rule(destination, next_hop, where, position, pattern))
    problems.check()
    return TransportMap(rules)


def file_lines(path: str, what: str = "") -> Iterator[tuple[str, str]]:
    """(FILE:LINE, text) of every line that holds more than a comment (policy/policy_file.py);
    `what` names the file in an error about the whole of it (`FILE: cannot read WHAT: ...`)."""
    return ((f"{path}:{number}", text) for number, text in read_lines(path, PolicyError, what=what))


def _substitute(line: str, definitions: dict[str, str], where: str, defs_path: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match[1]
        if name not in definitions:
            source = f" in {defs_path}" if defs_path else " (no transport-defs file is configured)"
            raise PolicyError(f"{where}: undefined variable ${name}{source}")
        return definitions[name]

    return _VARIABLE.sub(value, line)


def split_rule(line: str, where: str, rest_is: str = "next hop") -> tuple[str, str]:
    """Destination and the rest (`rest_is` names it in the error when there is none), apart at
    the first space or tab; a regex destination ends at the first unescaped slash followed by
    white space, so a regex may contain spaces."""
    if line.startswith("/"):
        match = re.match(r"/(?:\\.|[^\\])*?/(?=\s|$)", line)
        if not match:
            raise PolicyError(f"{where}: regex destination {line.split()[0]!r} has no closing /")
        destination, rest = match[0], line[match.end():]
    else:
        destination = re.match(r"[^ \t]*", line)[0]
        rest = line[len(destination):]
    if not rest.strip():
        raise PolicyError(f"{where}: rule for {destination!r} has no {rest_is}")
    return destination, rest.strip()


def check_pattern(destination: str, where: str) -> re.Pattern[str] | None:
    """Refuse a destination that is not a regex, wildcard, address or domain; a regex is
    compiled here, once, and the pattern returned for its rule (None for the other kinds)."""
    if destination.startswith("/"):
        return compile_regex(destination[1:-1], destination, where)
    try:
        if destination.startswith("*."):
            check_domain(destination[2:], destination)
        elif "@" in destination:
            parse_path(destination)
        else:
            check_domain(destination, destination)
    except AddressError as exc:
        raise PolicyError(f"{where}: bad destination: {exc}") from None
    return None
