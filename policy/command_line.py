"""The command line of a local delivery agent or a pipe next hop, and its placeholders.

    /usr/bin/maildrop -f ${sender}
    |user=robot per=message /usr/local/bin/robot --from ${sender} ${recipient}

The line is split into argv once, when the policy is loaded, with shell-like quoting (shlex)
but never by a shell: a placeholder is replaced inside the argv element it stands in, so an
address such as `"a;touch /tmp/x"@example.org` or `x$(id)@example.org` is only text to the
program. A quoting error or an unknown placeholder is an error of the policy file's line.

A pipe line may begin with options, words of the form `name=value` before the program:
`user=NAME` (the unix user it runs as, instead of pipe-user) and `per=message` (one run for all
the message's recipients of this next hop instead of one run each; an argument holding a
recipient's placeholder then becomes one argument per recipient, as Postfix's pipe(8) does).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# name -> what it stands for; the recipient's ones differ per recipient
SENDER_PLACEHOLDERS = {
    "sender": "the envelope sender (empty for <>)",
    "queue_id": "the queue id",
}
RECIPIENT_PLACEHOLDERS = {
    "recipient": "the recipient address",
    "original_recipient": "the recipient as first given, before rewriting",
    "mailbox": "the recipient's whole local part",
    "user": "the recipient's local part without its extension",
    "extension": "the part of the local part after the first +",
    "domain": "the recipient's domain",
}
PLACEHOLDERS = {**SENDER_PLACEHOLDERS, **RECIPIENT_PLACEHOLDERS}
PER_RECIPIENT, PER_MESSAGE = "recipient", "message"
EXTENSION_DELIMITER = "+"

_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
_OPTION = re.compile(r"([a-z]+)=(.*)")


class CommandLineError(ValueError):
    """A command line that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class CommandLine:
    argv: tuple[str, ...]  # placeholders not expanded yet
    user: str = ""  # user=NAME: who a pipe runs as ("" for the default)
    per: str = PER_RECIPIENT


def parse_command_line(text: str, *, options: bool) -> CommandLine:
    """Split a command line into argv; with `options`, leading `name=value` words are options."""
    try:
        words = shlex.split(text, comments=False, posix=True)
    except ValueError as exc:
        raise CommandLineError(f"cannot split {text!r} into arguments: {exc}") from None
    user, per = "", PER_RECIPIENT
    while options and words and not words[0].startswith("/") and (match := _OPTION.fullmatch(words[0])):
        name, value = match.groups()
        if name == "user" and value:
            user = value
        elif name == "per" and value in (PER_RECIPIENT, PER_MESSAGE):
            per = value
        else:
            raise CommandLineError(f"unknown option {words[0]!r} (options: user=NAME, per=recipient|message)")
        words.pop(0)
    if not words:
        raise CommandLineError(f"{text!r} names no program")
    if not words[0].startswith("/"):
        raise CommandLineError(f"the program {words[0]!r} must be an absolute path (PATH is not searched)")
    for word in words:
        for name in _PLACEHOLDER.findall(word):
            if name not in PLACEHOLDERS:
                raise CommandLineError(f"unknown placeholder ${{{name}}} in {word!r} "
                                       f"(known: {', '.join('${' + known + '}' for known in PLACEHOLDERS)})")
    return CommandLine(tuple(words), user, per)


def split_local(local_part: str) -> tuple[str, str]:
    """(user, extension) of a local part: `alice+lists` is ("alice", "lists")."""
    user, _, extension = local_part.partition(EXTENSION_DELIMITER)
    return user, extension


def expand(argv: Sequence[str], message_values: Mapping[str, str],
           recipients: Sequence[Mapping[str, str]]) -> list[str]:
    """argv with its placeholders replaced. An argument holding a recipient's placeholder is
    repeated for each of `recipients` (one, unless per=message); the others appear once."""
    expanded: list[str] = []
    for word in argv:
        names = set(_PLACEHOLDER.findall(word))
        if names & RECIPIENT_PLACEHOLDERS.keys():
            expanded += [_substitute(word, {**message_values, **values}) for values in recipients]
        else:
            expanded.append(_substitute(word, message_values))
    return expanded


def _substitute(word: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda match: values[match[1]], word)
