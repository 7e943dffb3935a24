"""The pending recipients of a queued message, read from its queue file's header alone.

The supervisor routes every message before it hands it out, so that it can count sessions per
destination, as Postfix's queue manager reads each message's envelope. It reads only the header
(the recipients come before the message), never more than the header may be, and a file it cannot
read this way is simply handed out with no destination known: the worker that tries it says what
is wrong with it.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from router.spool.files import open_regular
from router.spool.queue_file import MAX_HEADER, PENDING

FIRST_READ = 16384  # holds the header of nearly every message


def read_header(path: str) -> bytes | None:
    """A queue file's header, with the empty line that ends it; None if the file is gone, is not
    a regular file, or has no end of header within MAX_HEADER bytes."""
    try:
        fd, _ = open_regular(path)
    except OSError:
        return None
    try:
        data = os.read(fd, FIRST_READ)
        end = data.find(b"\n\n")
        if end < 0 and len(data) == FIRST_READ:
            data += os.read(fd, MAX_HEADER - FIRST_READ)
            end = data.find(b"\n\n")
    except OSError:
        return None
    finally:
        os.close(fd)
    return data[:end + 2] if end >= 0 else None


class Envelope(NamedTuple):
    addresses: list[str]  # of the recipients still pending
    rewritten: bool  # address rewriting is done
    warned: bool  # a delay warning went to the sender


def pending_recipients(path: str) -> Envelope | None:
    """The pending recipients and what routing and scheduling them needs; None if the file is
    gone or is not a queue file. Results only in the journal (a crash in the middle of an
    attempt) are not seen here: such a recipient is counted as pending, which costs at most a
    session slot it will not use."""
    header = read_header(path)
    if header is None:
        return None
    recipients: list[tuple[str, str]] = []  # (address, state)
    rewritten = warned = False
    for line in header.decode(errors="replace").split("\n"):
        key, _, value = line.partition(" ")
        if key == "rcpt":
            recipients.append((value.strip("<>"), PENDING))
        elif key == "state" and recipients:
            recipients[-1] = (recipients[-1][0], value)
        elif key == "rewritten":
            rewritten = True
        elif key == "warned":
            warned = True
    return Envelope([address for address, state in recipients if state == PENDING], rewritten, warned)
