"""The drain mark: a node that hands all its mail to a peer (`qrouter drain --to HOST[:PORT]`).

The mark is a file in the spool, `QUEUE-DIR/drain`, so that it outlives the daemon: a drain cut
short by a crash or a `kill -9` goes on when the daemon starts again, and every front door that
writes into the spool (the aiosmtpd handler, `qrouter enqueue`, qrouter-sendmail, the qpsmtpd
plugin, which tests the file's existence) sees it without asking the daemon. While it is there
the front doors refuse new mail with a temporary failure (`421 4.3.2` in SMTP, exit 75), and the
daemon routes every queued recipient to the peer (policy/routing.py `Policy.draining_to`).

The file holds one JSON object: `{"to": "HOST[:PORT]", "started": SECONDS, "sent": N}`, N the
recipients delivered to the peer so far as the daemon last recorded them (every few seconds and
when it stops, never per message: router/daemon/drain.py), so that the count outlives a restart.
It is written as every spool file is (staged, fsynced, renamed over the old one, the directory
fsynced: a front door finds the mark at every moment) and removed by `qrouter drain --cancel`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from router.spool.durable import fsync_dir, write_synced

DRAIN_FILE = "drain"
REFUSAL_DSN = "4.3.2"  # RFC 3463: system not accepting network messages


@dataclass(frozen=True)
class Drain:
    to: str  # the peer, HOST[:PORT] as `qrouter drain --to` gave it
    started: float  # when the drain began, seconds since the epoch
    sent: int = 0  # recipients delivered to the peer, as last recorded

    def refusal(self) -> str:
        """What a front door tells a client, after its reply code (421, or exit 75)."""
        return f"{REFUSAL_DSN} this node is draining its queue to {self.to} and takes no new mail; try another"


def drain_path(queue_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(queue_dir), DRAIN_FILE)


def read_drain(queue_dir: str | os.PathLike) -> Drain | None:
    """The drain in force on the spool, or None. A mark that cannot be read (cut short, edited by
    hand) still means draining: taking mail into a spool that is being emptied would strand it."""
    try:
        with open(drain_path(queue_dir), encoding="utf-8") as handle:
            text = handle.read(4096)
    except FileNotFoundError:
        return None
    except OSError:
        return Drain("an unknown peer (the drain mark cannot be read)", 0.0)
    try:
        found = json.loads(text)
        return Drain(str(found["to"]), float(found["started"]), max(0, int(found.get("sent", 0))))
    except (ValueError, KeyError, TypeError):
        return Drain(f"an unknown peer (the drain mark {drain_path(queue_dir)} is not readable JSON)", 0.0)


def write_drain(queue_dir: str | os.PathLike, drain: Drain, *, mode: int = 0o644) -> None:
    """Make the mark durable: staged beside it, fsynced, renamed over it, the spool fsynced.
    Readable by all (mode): the front doors of the spool group read it."""
    path = drain_path(queue_dir)
    staged = f"{path}.new"
    record = {"to": drain.to, "started": drain.started, "sent": drain.sent}
    write_synced(staged, json.dumps(record).encode() + b"\n", mode=mode)
    os.rename(staged, path)
    fsync_dir(os.fspath(queue_dir))


def remove_drain(queue_dir: str | os.PathLike) -> bool:
    """End the drain; False if there was none."""
    try:
        os.unlink(drain_path(queue_dir))
    except FileNotFoundError:
        return False
    fsync_dir(os.fspath(queue_dir))
    return True
