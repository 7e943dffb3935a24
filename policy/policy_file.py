"""The one reader of the config file and every policy file (transports, transport-defs, aliases,
rewriting, relay-auth): how a file is opened, decoded, cut into lines and rid of comments.
docs/policy-files.md describes the rules for whoever writes the files.

- Only a regular file is read, of at most MAX_SIZE bytes: a FIFO, a device or a directory is
  refused at once, never waited on or read without end.
- The text is UTF-8; a line that is not is refused, naming its line.
- Lines end at "\\n" only, and a "\\r" before it is dropped, so CRLF files read the same. Other
  characters that str.splitlines() would break at (\\x0b, \\x0c, \\x1c-\\x1e, U+0085, U+2028,
  U+2029) are part of the line, so line numbers are those of any editor and no character can cut
  a rule in two.
- A `#` at the start of a line, or after a space or tab, starts a comment that runs to the end of
  the line; a `#` after anything else (`a#b`) is kept.
- Spaces and tabs around the text are dropped; lines left empty are skipped.

A switch is written the same way in every file too: parse_boolean. And every reader reports all
the bad lines of a file at once, not the first alone: Problems.

It opens files as every reader of outside files does (router/spool/files.py).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from router.spool.files import NotARegularFile, open_regular, read_at_most

MAX_SIZE = 16 * 1024 * 1024

_COMMENT = re.compile(r"(?:^|[ \t])#.*", re.DOTALL)


def read_lines(path: str, error: type[Exception], *, what: str = "",
               private: bool = False) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of the file at `path` that holds more than a comment.

    The file is read here, at the call; its lines are decoded as they are taken. Every problem is
    raised as `error`, its text starting `PATH: ` or `PATH:LINE: `: `PATH: cannot read WHAT: why`
    for a file that cannot be read, `PATH:LINE: not valid UTF-8` for a line that is not text. With
    `private`, a file that group or others have any access to is refused (it holds passwords).
    """
    return split_lines(read_bytes(path, error, what=what, private=private), path, error)


def read_bytes(path: str, error: type[Exception], *, what: str = "", private: bool = False) -> bytes:
    """The bytes of a regular file of at most MAX_SIZE bytes; see read_lines."""
    cannot = f"{path}: cannot read{' ' + what if what else ''}"
    try:
        fd, info = open_regular(path, follow_links=True)  # an administrator's link into /etc is theirs
    except NotARegularFile as exc:
        raise error(f"{cannot}: {exc.kind}, not a regular file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise error(f"{cannot}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        if private and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise error(f"{path}: readable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
                        "make it 0600")
        data = read_at_most(fd, MAX_SIZE + 1)  # one byte more: a file that has grown is caught too
    except OSError as exc:
        raise error(f"{cannot}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SIZE:
        raise error(f"{cannot}: larger than {MAX_SIZE // (1024 * 1024)} MB")
    return data


_BOOLEAN_WORDS = {"1": True, "yes": True, "true": True, "on": True,
                  "0": False, "no": False, "false": False, "off": False}


def parse_boolean(text: str) -> bool:
    """A yes/no value as every file writes one (any case); ValueError saying what it must be."""
    if text.lower() not in _BOOLEAN_WORDS:
        raise ValueError("must be yes or no (also 1/0, true/false, on/off)")
    return _BOOLEAN_WORDS[text.lower()]


def split_lines(data: bytes, source: str, error: type[Exception]) -> Iterator[tuple[int, str]]:
    """The lines of `data` as read_lines gives them, errors naming `source`."""
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"{source}:{number}: not valid UTF-8") from None
        text = _COMMENT.sub("", line, count=1).strip(" \t")
        if text:
            yield number, text


class Problems:
    """The errors of one reading of one or more files, so that a check names every bad line at
    once rather than one per run. Each line (or file) is read in `with problems.collecting():`,
    which keeps an `error` raised there and goes on; `check()` then raises them all as one
    `error`, a line each, in the order found."""

    def __init__(self, error: type[Exception]) -> None:
        self.error = error
        self.found: list[str] = []

    @contextmanager
    def collecting(self) -> Iterator[None]:
        try:
            yield
        except self.error as exc:
            self.found.append(str(exc))

    def check(self) -> None:
        if self.found:
            raise self.error("\n".join(self.found))
