"""Next hops: the right-hand side of a transport rule, `default-transport` and `relayhost`.

One parser for every place a next hop is written, so they all mean the same thing:

    queue/maildir DIR         deliver into a Maildir; DIR may hold %d (domain) and %u (local part)
    queue/discard             accept and throw away (logged as sent)
    queue/error [D.D.D] TEXT  refuse permanently (default 5.0.0)
    queue/retry [D.D.D] TEXT  defer (default 4.0.0): holds mail back until the policy changes
    queue/NAME ARGUMENT       a transport another package registers (policy/transport_registry.py)
    host, host:port, [host]:port, [::1]:2425, a,b,...   SMTP relay hosts, round robin
    lmtp:host:port, lmtp:/path/to/socket                 LMTP
    |[user=NAME] [per=message] /program args            pipe into a program (policy/command_line.py)
    /usr/bin/maildrop -f ${sender}                      local delivery agent, as the aliased unix user
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import quote

from policy import transport_registry
from policy.command_line import PER_RECIPIENT, CommandLineError, parse_command_line

MAILDIR, DISCARD, ERROR, RETRY = "maildir", "discard", "error", "retry"
BUILTIN_QUEUE = (MAILDIR, DISCARD, ERROR, RETRY)  # their arguments are checked here
SMTP, LMTP, PIPE, MDA, MX = "smtp", "lmtp", "pipe", "mda", "mx"
SITE = "site"  # not a next hop: the destination MX rollup counts domains with the same MX hosts against

_DSN = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")
_HOST = re.compile(r"(?:\[(?P<literal>[^\]]+)\]|(?P<name>[A-Za-z0-9.\-_]+))(?::(?P<port>\d+))?")


class NextHopError(ValueError):
    """A next hop that cannot be understood; the message says what is wrong with it."""


@dataclass(frozen=True)
class NextHop:
    kind: str
    argument: str = ""
    text: str = ""
    user: str = ""  # local delivery: the unix user the aliases file gave; a pipe: the one it runs as
    argv: tuple[str, ...] = ()  # a pipe's or local agent's program and arguments, placeholders unexpanded
    per: str = PER_RECIPIENT  # a pipe: one run per recipient, or per message (policy/command_line.py)

    def __str__(self) -> str:
        text = self.text or self.kind
        return f"{text} (user {self.user})" if self.user else text

    @property
    def destination(self) -> str:
        """The destination the scheduler counts sessions against and judges alive or dead: one
        word (no white space, no comma), the same for every recipient routed to this next hop."""
        return quote(f"{self.kind}:{self.argument}", safe=":/[]._-@+")

    def verdict(self) -> tuple[str, str]:
        """The status code and text of a `queue/error` or `queue/retry` hop: what delivery answers
        for its recipients and what recipient verification answers at RCPT, in the same words."""
        dsn, _, text = self.argument.partition(" ")
        return dsn, text or self.text


def mx_route(domain: str) -> NextHop:
    """MX routing to one domain: a next hop of its own, so recipients group by domain."""
    return NextHop(MX, domain.lower(), f"MX routing for {domain.lower()}")


def parse_next_hop(text: str, base_dir: str = "") -> NextHop:
    """Parse a next hop; relative Maildir paths are taken from `base_dir` (a config file's
    directory) so the daemon means the same directory whatever its working directory."""
    text = text.strip()
    if not text:
        raise NextHopError("empty next hop")
    if text.startswith("queue/"):
        return _parse_queue_transport(text, base_dir)
    if text.startswith(("|", "/")):
        pipe = text.startswith("|")
        try:
            line = parse_command_line(text[1:] if pipe else text, options=pipe)
        except CommandLineError as exc:
            raise NextHopError(f"{'pipe' if pipe else 'local delivery agent'}: {exc}") from None
        return NextHop(PIPE if pipe else MDA, text[1:].strip() if pipe else text, text, line.user, line.argv, line.per)
    if text.startswith("lmtp:"):
        target = text[5:]
        if not target.startswith("/"):
            parse_hosts(target)
        return NextHop(LMTP, target, text)
    parse_hosts(text)
    return NextHop(SMTP, text, text)


def _parse_queue_transport(text: str, base_dir: str) -> NextHop:
    name, _, argument = text[len("queue/"):].partition(" ")
    argument = argument.strip()
    if name == MAILDIR:
        if not argument:
            raise NextHopError("queue/maildir needs a directory, e.g. 'queue/maildir /var/mail/%d/%u'")
        return NextHop(MAILDIR, os.path.join(base_dir or os.getcwd(), argument), text)
    if name == DISCARD:
        return NextHop(DISCARD, "", text)
    if name in (ERROR, RETRY):
        code, _, rest = argument.partition(" ")
        wanted = "5" if name == ERROR else "4"
        if _DSN.fullmatch(code):
            if code[0] != wanted:
                raise NextHopError(f"queue/{name} takes a {wanted}.X.X status, not {code}")
            argument = f"{code} {rest.strip()}".strip()
        else:
            argument = f"{wanted}.0.0 {argument}".strip()
        return NextHop(name, argument, text)
    return _parse_plugin(name, argument, text)


def queue_kind(name: str) -> str:
    """The NextHop kind of `queue/NAME`: a built-in's name, else `queue/NAME` (so that no
    package can take the kind of SMTP, LMTP or a pipe)."""
    return name if name in BUILTIN_QUEUE else f"queue/{name}"


def queue_name(kind: str) -> str | None:
    """The NAME of `queue/NAME` for a NextHop kind; None when the kind is not a queue transport."""
    if kind in BUILTIN_QUEUE:
        return kind
    return kind[len("queue/"):] if kind.startswith("queue/") else None


def _parse_plugin(name: str, argument: str, text: str) -> NextHop:
    """A transport of another package: known by its entry point, its argument checked by its
    factory's `check`, if it has one (the argument is given as written, paths not resolved)."""
    installed = transport_registry.installed()
    if name not in installed:
        known = [*BUILTIN_QUEUE, *sorted(set(installed) - set(BUILTIN_QUEUE))]
        raise NextHopError(f"unknown queue transport 'queue/{name}' (known: "
                           f"{', '.join(f'queue/{known_name}' for known_name in known)})")
    try:
        check = getattr(transport_registry.load(name), "check", None)
    except Exception as exc:
        raise NextHopError(f"queue/{name} cannot be loaded: {type(exc).__name__}: {exc}") from None
    try:
        if check is not None:
            check(argument)
    except ValueError as exc:
        raise NextHopError(f"queue/{name}: {exc}") from None
    except Exception as exc:
        raise NextHopError(f"queue/{name}: checking {argument!r} failed: {type(exc).__name__}: {exc}") from None
    return NextHop(queue_kind(name), argument, text)


def parse_hosts(text: str) -> list[tuple[str, int | None]]:
    """Split relay-host notation into (destination, port) pairs; port None means the default.

    A destination keeps its brackets: `[host]` means "no MX lookup" (Postfix's convention).
    """
    hosts = []
    for item in text.split(","):
        item = item.strip()
        match = _HOST.fullmatch(item)
        if not match:
            raise NextHopError(f"{item!r} is not a host, host:port or [address]:port")
        port = match["port"]
        destination = f"[{match['literal']}]" if match["literal"] else match["name"]
        hosts.append((destination, _port(port, item) if port else None))
    return hosts


def _port(digits: str, item: str) -> int:
    """The port `digits` name; the length is checked before int(), which refuses numbers of
    over 4,300 digits with a ValueError of its own."""
    significant = digits.lstrip("0")
    if len(significant) > 5 or not 0 < int(significant or "0") < 65536:
        raise NextHopError(f"port {digits} in {item!r} is out of range (1-65535)")
    return int(significant)
