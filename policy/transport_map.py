"""The transport policy file: which next hop a recipient goes to, by domain, wildcard, regex or
address, first matching rule winning.

    # destination           next hop
    user@foo.bar            queue/maildir /var/mail/special
    foo.bar                 mx.foo.bar:2525
    *.foo                   [10.1.1.1]
    /.*spl-[0-9]{6}\\.foo\\.bar/  $splunkmta

Lines and comments are read as in every policy file (policy/policy_file.py). Rules are kept in
hashes (addresses, domains, wildcard suffixes) plus a list of compiled regexes, and every rule
remembers its line: a lookup takes the matching rule with the lowest line number, so first-match
order holds without scanning thousands of plain domain rules per recipient.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from policy.next_hop import NextHop, NextHopError, parse_next_hop
from policy.policy_file import read_lines
from router.address import AddressError, check_domain, parse_path, split_address

_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PolicyError(ValueError):
    """A policy file that cannot be used; the text starts with FILE:LINE."""


def compile_regex(regex: str, shown: str, where: str, error: type[ValueError] = PolicyError) -> re.Pattern[str]:
    """`regex` compiled case-insensitively, or `error` saying `where: bad regex SHOWN: why`.

    Every policy file that takes regexes compiles them here, so a hostile one is refused like any
    other bad line instead of ending a reload: besides re.error, re.compile raises OverflowError
    (a repeat count or character code too large for it), RecursionError (groups nested about 500
    deep) and ValueError (clashing flags, a repeat count of thousands of digits).
    """
    try:
        return re.compile(regex, re.IGNORECASE)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise error(f"{where}: bad regex {shown}: {_regex_problem(exc)}") from None


def _regex_problem(exc: Exception) -> str:
    """What is wrong with a regex, in words for whoever wrote it rather than for a programmer."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
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


class TransportMap:
    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self._addresses: dict[str, Rule] = {}
        self._domains: dict[str, Rule] = {}
        self._wildcards: dict[str, Rule] = {}
        self._regexes: list[tuple[re.Pattern[str], Rule]] = []
        for rule in rules:
            text = rule.destination
            if rule.pattern is not None:
                self._regexes.append((rule.pattern, rule))
            elif text.startswith("*."):
                self._wildcards.setdefault(normalize_domain(text[2:]), rule)
            elif "@" in text:
                self._addresses.setdefault(normalize_address(text), rule)
            else:
                self._domains.setdefault(normalize_domain(text), rule)

    def lookup(self, address: str) -> Rule | None:
        """The first rule, in file order, that matches `address`."""
        _, domain = split_address(address)
        domain = normalize_domain(domain)
        labels = domain.split(".")
        candidates = [self._addresses.get(normalize_address(address)), self._domains.get(domain)]
        candidates += [self._wildcards.get(".".join(labels[i:])) for i in range(1, len(labels))]
        best: Rule | None = None
        for rule in candidates:
            if rule is not None and (best is None or rule.position < best.position):
                best = rule
        for pattern, rule in self._regexes:
            if best is not None and rule.position > best.position:
                break
            if pattern.fullmatch(address):
                return rule
        return best


def load_definitions(path: str) -> dict[str, str]:
    """The transport-defs file: `name value` a line, for `$name` in the transports file."""
    definitions: dict[str, str] = {}
    for where, line in file_lines(path):
        name, _, value = line.partition(" ")
        if not _NAME.fullmatch(name):
            raise PolicyError(f"{where}: {name!r} is not a variable name (letters, digits, _)")
        if not value.strip():
            raise PolicyError(f"{where}: variable {name} has no value")
        if name in definitions:
            raise PolicyError(f"{where}: variable {name} is defined twice")
        definitions[name] = value.strip()
    return definitions


def load_transport_map(path: str, definitions: dict[str, str], defs_path: str = "") -> TransportMap:
    base_dir = os.path.dirname(os.path.abspath(path))
    rules = []
    for position, (where, line) in enumerate(file_lines(path)):
        line = _substitute(line, definitions, where, defs_path)
        destination, hop_text = _split_rule(line, where)
        pattern = _check_destination(destination, where)
        try:
            next_hop = parse_next_hop(hop_text, base_dir)
        except NextHopError as exc:
            raise PolicyError(f"{where}: next hop {hop_text!r}: {exc}") from None
        rules.append(Rule(destination, next_hop, where, position, pattern))
    return TransportMap(rules)


def file_lines(path: str) -> Iterator[tuple[str, str]]:
    """(FILE:LINE, text) of every line that holds more than a comment (policy/policy_file.py)."""
    return ((f"{path}:{number}", text) for number, text in read_lines(path, PolicyError))


def _substitute(line: str, definitions: dict[str, str], where: str, defs_path: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match[1]
        if name not in definitions:
            source = f" in {defs_path}" if defs_path else " (no transport-defs file is configured)"
            raise PolicyError(f"{where}: undefined variable ${name}{source}")
        return definitions[name]

    return _VARIABLE.sub(value, line)


def _split_rule(line: str, where: str) -> tuple[str, str]:
    """Destination and next hop; a regex destination ends at the first unescaped slash
    followed by white space, so a regex may contain spaces."""
    if line.startswith("/"):
        match = re.match(r"/(?:\\.|[^\\])*?/(?=\s|$)", line)
        if not match:
            raise PolicyError(f"{where}: regex destination {line.split()[0]!r} has no closing /")
        destination, rest = match[0], line[match.end():]
    else:
        destination, _, rest = line.partition(" ")
    if not rest.strip():
        raise PolicyError(f"{where}: rule for {destination!r} has no next hop")
    return destination, rest.strip()


def _check_destination(destination: str, where: str) -> re.Pattern[str] | None:
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
