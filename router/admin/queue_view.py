"""Looking at the queue: the messages in its directories, chosen by selectors, one at a time.

Listing reads each file's header only (the envelope, the recipients and their last replies come
before the message), and yields messages one by one as it finds them, so that `qrouter queue
list` prints its first line at once and holds no more than one message in memory, however many
there are. It reads the files and never asks the daemon: a listing must not slow delivery.

Selectors combine (all must hold): the recipient domain of a pending recipient, the sender, the
age, the last reply of a pending recipient (a regex), the next hop a pending recipient goes to
by the policy in force.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from policy.routing import Policy
from router.spool import ACTIVE, ARCHIVE, CORRUPT, DEFERRED, HOLD, INCOMING, Spool
from router.spool.address import split_address
from router.spool.envelope import read_header
from router.spool.queue_file import CorruptQueueFile, QueueFile, parse
from router.spool.queue_id import is_queue_id

WAITING = (INCOMING, ACTIVE, DEFERRED, HOLD)  # what `list` shows unless asked for another queue
ALL = (*WAITING, ARCHIVE, CORRUPT)
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # minutes, as qshape's
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def age(seconds: float) -> str:
    """A duration as people read it: 45s, 12m3s, 5h20m, 3d4h."""
    whole = max(0, int(seconds))
    if whole >= 86400:
        return f"{whole // 86400}d{whole % 86400 // 3600}h"
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60}s"
    return f"{whole}s"


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `3d`, `1w` in seconds; ValueError otherwise."""
    match = re.fullmatch(r"(\d{1,9}(?:\.\d+)?)([smhdw]?)", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 2h, 3d)")
    return float(match[1]) * _UNITS[match[2] or "s"]


@dataclass
class Selection:
    to_domain: str = ""
    sender: str | None = None
    older_than: float = 0.0
    reply: re.Pattern[str] | None = None
    destination: str = ""
    policy: Policy | None = field(default=None, repr=False)  # for `destination`

    def matches(self, message: Message, now: float) -> bool:
        queue_file = message.file
        if self.sender is not None and queue_file.sender.lower() != self.sender.lower():
            return False
        if self.older_than and now - queue_file.arrival < self.older_than:
            return False
        pending = queue_file.pending()
        if self.to_domain:
            pending = [r for r in pending if split_address(r.address)[1].lower() == self.to_domain.lower()]
        if self.reply is not None:
            pending = [r for r in pending if self.reply.search(r.reply)]
        if self.destination and self.policy is not None:
            pending = [r for r in pending if self.destination in _names(self.policy, r.address, queue_file.rewritten)]
        return bool(pending) or not (self.to_domain or self.reply or self.destination)


def _names(policy: Policy, address: str, rewritten: bool) -> set[str]:
    hop = policy.route_queued(address, rewritten).next_hop
    return {str(hop), hop.text, hop.destination, hop.argument}


@dataclass
class Message:
    queue: str
    queue_id: str
    file: QueueFile  # header only: no message bytes, its size in `file.size`
    mtime: float  # in deferred/: when it is due


def messages(spool: Spool, queues: Iterable[str], selection: Selection | None = None,
             ids: Iterable[str] = ()) -> Iterator[Message]:
    """The messages in `queues` (or those named by `ids`, wherever they are) that `selection`
    chooses, one at a time, oldest queue first; a file that is not a readable queue file is
    skipped."""
    now = time.time()
    wanted = set(ids)
    for queue in queues:
        try:
            names = os.scandir(spool.path(queue))
        except OSError:
            continue
        with names:
            for entry in names:
                if not is_queue_id(entry.name) or (wanted and entry.name not in wanted):
                    continue
                message = read_message(spool, queue, entry.name)
                if message is not None and (selection is None or selection.matches(message, now)):
                    yield message


def read_message(spool: Spool, queue: str, queue_id: str) -> Message | None:
    path = spool.path(queue, queue_id)
    header = read_header(path)
    if header is None:
        return None
    try:
        queue_file = parse(header, path, header_only=True)
        return Message(queue, queue_id, queue_file, os.lstat(path).st_mtime)
    except (CorruptQueueFile, OSError):
        return None


def find(spool: Spool, queue_id: str) -> Message | None:
    """A message by id, in whichever queue it is."""
    if not is_queue_id(queue_id):
        return None
    return next((m for queue in ALL if (m := read_message(spool, queue, queue_id)) is not None), None)


def as_json(message: Message) -> dict:
    """One line of `queue list --json`: the fields of Postfix's `postqueue -j`, and more.
    `forced_expire` (Postfix 3.5 and later: expired by `postsuper -e`) is always false, since no
    qrouter command expires a message before max-age; it is there for the scripts that read it."""
    queue_file = message.file
    return {
        "queue_name": message.queue, "queue_id": message.queue_id, "arrival_time": int(queue_file.arrival),
        "message_size": queue_file.size, "forced_expire": False, "sender": queue_file.sender,
        "recipients": [{"address": r.address, "orig_address": r.orcpt.partition(";")[2] or r.address,
                        "delay_reason": r.reply, "dsn": r.dsn, "state": r.state} for r in queue_file.recipients],
        "attempts": queue_file.attempts,
        "next_attempt": message.mtime if message.queue == DEFERRED else None,
    }


def as_lines(message: Message) -> list[str]:
    """mailq's shape: id (`*` in active/, `!` in hold/), size, arrival, sender; then each pending
    recipient under its last reply."""
    queue_file = message.file
    mark = {ACTIVE: "*", HOLD: "!"}.get(message.queue, "")
    arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(queue_file.arrival))
    lines = [f"{message.queue_id + mark:<24} {queue_file.size:>8} {arrival}  {queue_file.sender or '<>'}"]
    for rcpt in queue_file.pending() or queue_file.recipients:
        if rcpt.reply:
            lines.append(f"{'':<10}({rcpt.reply[:150]})")
        lines.append(f"{'':<43}{rcpt.address}")
    return lines


def shape(found: Iterable[Message], now: float, by_sender: bool = False, top: int = 20) -> list[str]:
    """qshape: pending recipients (or messages by sender domain) per domain and age bucket, the
    top domains and a TOTAL row; then the same by the class of the last error."""
    by_domain: dict[str, Counter[int]] = defaultdict(Counter)
    by_error: dict[str, Counter[int]] = defaultdict(Counter)
    for message in found:
        minutes = (now - message.file.arrival) / 60
        bucket = next((i for i, limit in enumerate(AGE_BUCKETS) if minutes < limit), len(AGE_BUCKETS))
        if by_sender:
            by_domain[split_address(message.file.sender)[1].lower() or "<>"][bucket] += 1
        for rcpt in message.file.pending():
            if not by_sender:
                by_domain[split_address(rcpt.address)[1].lower()][bucket] += 1
            by_error[_error_class(rcpt.dsn)][bucket] += 1
    heading = " ".join(f"{limit:>5}" for limit in AGE_BUCKETS) + f" {str(AGE_BUCKETS[-1]) + '+':>6}"
    lines = []
    for title, table in (("sender domain" if by_sender else "domain", by_domain), ("last error", by_error)):
        total: Counter[int] = Counter()
        for counts in table.values():
            total.update(counts)
        lines.append(f"{title:<32} {'T':>6} {heading}")
        ranked = sorted(table.items(), key=lambda item: (-sum(item[1].values()), item[0]))
        for name, counts in [("TOTAL", total), *ranked[:top]]:
            cells = " ".join(f"{counts[i]:>5}" for i in range(len(AGE_BUCKETS))) + f" {counts[len(AGE_BUCKETS)]:>6}"
            lines.append(f"{name[:32]:<32} {sum(counts.values()):>6} {cells}")
        lines.append("")
    return lines[:-1]


def _error_class(dsn: str) -> str:
    return dsn if dsn else "not tried yet"
