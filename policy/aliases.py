"""The aliases file for local delivery: `virtual-user unix-user` a line, local parts only.

    root        admin
    postmaster  admin
    .*master    admin       # a regex: any local part ending in "master"

A local part with an extension (`alice+lists`) that has no entry of its own is looked up
without it (`alice`), as Postfix's local(8) does. A virtual user with regex characters
(`*?[](){}|^$\\`) is a regex matched against the whole local part, case-insensitively; otherwise
it is compared case-insensitively as it is. The first entry in file order wins. The local
delivery agent never runs as root, so root's mail must be aliased to someone, and no alias may
point at root. Lines and comments are read as in every policy file
(policy/policy_file.py).
"""

from __future__ import annotations

import pwd
import re
from dataclasses import dataclass, field

from policy.policy_file import Problems
from policy.transport_map import PolicyError, compile_regex, file_lines

_REGEX_CHARS = re.compile(r"[*?\[\](){}|^$\\]")


@dataclass(frozen=True)
class Alias:
    virtual: str
    user: str
    where: str
    position: int
    pattern: re.Pattern[str] | None = field(default=None, repr=False, compare=False)  # of a regex entry


class Aliases:
    def __init__(self, entries: list[Alias], path: str):
        self.path = path
        self.entries = entries
        self._exact: dict[str, Alias] = {}
        self._regexes: list[tuple[re.Pattern[str], Alias]] = []
        for entry in entries:
            if entry.pattern is not None:
                self._regexes.append((entry.pattern, entry))
            else:
                self._exact.setdefault(entry.virtual.lower(), entry)

    def lookup(self, local_part: str) -> Alias | None:
        best = self._exact.get(local_part.lower())
        for pattern, entry in self._regexes:
            if best is not None and entry.position > best.position:
                break
            if pattern.fullmatch(local_part):
                return entry
        return best


def load_aliases(path: str, *, local_delivery: bool) -> Aliases:
    """Read the file; with local delivery configured, an entry for root is required."""
    entries = []
    problems = Problems(PolicyError)
    for position, (where, line) in enumerate(file_lines(path)):
        with problems.collecting():
            fields = line.split()
            if len(fields) != 2:
                raise PolicyError(f"{where}: expected 'virtual-user unix-user'")
            virtual, user = fields
            if "@" in virtual:
                raise PolicyError(f"{where}: {virtual!r}: aliases take local parts, not addresses")
            pattern = compile_regex(virtual, repr(virtual), where) if _REGEX_CHARS.search(virtual) else None
            try:
                uid = pwd.getpwnam(user).pw_uid
            except (KeyError, ValueError):  # ValueError: a name no account can have (a NUL byte)
                raise PolicyError(f"{where}: no such unix user {user!r}") from None
            if uid == 0:
                raise PolicyError(f"{where}: {virtual} -> {user}: local delivery never runs as root")
            entries.append(Alias(virtual, user, where, position, pattern))
    aliases = Aliases(entries, path)
    if local_delivery and aliases.lookup("root") is None:
        problems.found.append(f"{path}: no entry for root (local delivery never delivers to root: alias it)")
    problems.check()
    return aliases
