"""queue/maildir: delivery into a Maildir, the way the Maildir specification asks.

The message, with Return-Path: and Delivered-To: in front (workers/delivery_fields.py), goes
to tmp/ under a unique name, is fsynced, renamed into new/, and new/ is fsynced: a message
reported delivered is on disk. `%d` and `%u` in the directory give each
domain or user its own Maildir; they are escaped so that no address can climb out of the tree.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import socket
import time
from typing import TYPE_CHECKING

from policy.next_hop import NextHop
from router.spool.address import split_address
from router.spool.durable import fsync_dir, write_synced
from router.spool.queue_file import QueueFile, Recipient
from workers.delivery_fields import LOOP_DSN, loop_reply, looping, with_delivery_fields
from workers.transport import BOUNCED, DEFERRED, SENT, NoOpClose, Outcome

if TYPE_CHECKING:
    from router.config import Config

_UNSAFE = re.compile(r"[^A-Za-z0-9_+=@.,\-\u0080-\U0010ffff]|^\.")
_counter = itertools.count(1)


def escape(part: str) -> str:
    """A local part or domain as one safe path component: `/`, control characters and a
    leading dot become %XX."""
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m[0].encode()), part) or "%00"


def maildir_for(template: str, recipient: str) -> str:
    local, domain = split_address(recipient)
    return template.replace("%d", escape(domain.lower())).replace("%u", escape(local))


class MaildirTransport(NoOpClose):
    """Registered as `maildir` in the entry point group qrouter.transports (pyproject.toml)."""

    def __init__(self, config: Config | None = None) -> None:
        self.hostname = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self.known: set[str] = set()

    def deliver(self, message: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        """One copy per directory, with Return-Path: and a Delivered-To: for each of its
        recipients; a recipient the message has been delivered to before is a loop (5.4.6)."""
        looped = set(looping(message.message, (r.address for r in recipients)))
        by_dir: dict[str, list[str]] = {}
        for rcpt in recipients:
            if rcpt.address not in looped:
                by_dir.setdefault(maildir_for(hop.argument, rcpt.address), []).append(rcpt.address)
        outcomes = {directory: self._deliver_one(with_delivery_fields(message.message, message.sender, addresses),
                                                 directory)
                    for directory, addresses in by_dir.items()}
        return [Outcome(BOUNCED, LOOP_DSN, loop_reply(rcpt.address), f"maildir[{hop.argument}]")
                if rcpt.address in looped else outcomes[maildir_for(hop.argument, rcpt.address)]
                for rcpt in recipients]

    def _deliver_one(self, data: bytes, directory: str) -> Outcome:
        relay = f"maildir[{directory}]"
        try:
            if directory not in self.known:
                for sub in ("tmp", "new", "cur"):
                    os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
                self.known.add(directory)
            name = self._unique_name()
            staged = os.path.join(directory, "tmp", name)
            write_synced(staged, data, exclusive=True)
            os.rename(staged, os.path.join(directory, "new", name))
            fsync_dir(os.path.join(directory, "new"))
        except OSError as exc:
            self.known.discard(directory)
            refused = f" (as user {pwd.getpwuid(os.getuid()).pw_name})" if isinstance(exc, PermissionError) else ""
            return Outcome(DEFERRED, "4.2.0" if exc.filename else "4.3.0",
                           f"cannot deliver to Maildir: {exc.strerror or exc}"
                           + (f": {exc.filename}" if exc.filename else "") + refused, relay)
        return Outcome(SENT, "2.0.0", f"delivered to maildir as {name}", relay)

    def _unique_name(self) -> str:
        now = time.time()
        seconds = int(now)
        return f"{seconds}.M{int((now - seconds) * 1e6)}P{os.getpid()}Q{next(_counter)}.{self.hostname}"
