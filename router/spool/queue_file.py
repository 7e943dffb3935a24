"""The queue file: one message with its envelope and delivery state, self-describing and versioned.

The format is specified in docs/queue-format.md. In short: a UTF-8 header of `key value` lines
ending with an empty line, the message bytes (as many as the `size` line says), then a journal of
`@N key value` lines that record per-recipient results appended during a delivery attempt. The
journal lets a worker make "recipient N was delivered" durable with one small append and fsync,
without rewriting a message that may be megabytes long.

The journal also holds `@* crash` lines, one for each worker that died holding the message
(appended by the supervisor), and `@* held` when it was set aside as poison: the count of deaths
lives in the file, so it survives a restart of the daemon. Version 2 of the format adds the
`crashes` header key, where a rewrite keeps that count; a file without it is written as version 1.
Version 3 adds what reports need: `reported yes` on a recipient whose failure (or success, when
asked) has been reported to the sender, and `warned` with the time a delay warning was queued.
A file is written in the oldest version that holds what it has, so older readers still read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from router.spool.address import AddressError, parse_path
from router.spool.queue_id import is_queue_id

MAGIC = "qrouter-queue-file"
VERSION = 1  # what a file is written as when it needs nothing newer, so older readers still read it
CRASHES_VERSION = 2  # the version that adds the `crashes` key
REPORTS_VERSION = 3  # the version that adds `reported` (a recipient's) and `warned`
VERSIONS = (VERSION, CRASHES_VERSION, REPORTS_VERSION)
POISON_CRASHES = 3  # a message whose delivery killed this many workers is moved to hold/
CRASH_RECORD = b"@* crash\n"  # journal: a worker died holding the message (appended by the supervisor)
HELD_RECORD = b"@* held\n"  # journal: set aside as poison; a release from hold/ starts counting again
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
STATES = (PENDING, DELIVERED, FAILED)
MAX_HEADER = 1 << 20
MAX_OVERHEAD = 4 * MAX_HEADER  # a file may hold this much more than its message: header and journal
LOG_KEEP = 20

_ENVELOPE_KEYS = {"id", "arrival", "attempts", "crashes", "warned", "sender", "envid", "ret", "rewritten", "log",
                  "size"}
_RECIPIENT_KEYS = {"notify", "orcpt", "state", "dsn", "relay", "reply", "reported"}
_NEWER_KEYS = {"crashes": CRASHES_VERSION, "warned": REPORTS_VERSION, "reported": REPORTS_VERSION}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_JOURNAL = re.compile(rb"@(\d{1,9}) (\w+) ?(.*)")
_INTEGER = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


class CorruptQueueFile(ValueError):
    """A queue file that cannot be read; the message names the line or part that is wrong."""


def clean(text: str) -> str:
    """Make text from anywhere (a peer's reply, an exception) safe as one header value."""
    return _CONTROL.sub("?", text)


@dataclass
class Recipient:
    address: str
    state: str = PENDING
    notify: str = ""
    orcpt: str = ""
    dsn: str = ""
    relay: str = ""
    reply: str = ""
    reported: bool = False  # its failure, or its success when NOTIFY asked, is reported to the sender

    def header_lines(self) -> list[str]:
        lines = [f"rcpt <{self.address}>"]
        for key in ("notify", "orcpt", "dsn", "relay", "reply"):
            value = getattr(self, key)
            if value:
                lines.append(f"{key} {clean(value)}")
        if self.state != PENDING:
            lines.append(f"state {self.state}")
        if self.reported:
            lines.append("reported yes")
        return lines


@dataclass
class QueueFile:
    queue_id: str
    arrival: float
    sender: str
    recipients: list[Recipient]
    message: bytes
    attempts: int = 0
    envid: str = ""
    ret: str = ""
    rewritten: bool = False  # address rewriting done: never again, also after a restart
    log: list[str] = field(default_factory=list)
    crashes: int = 0  # workers that died holding it (header and journal), since queued or last held
    warned: float = 0.0  # when a delay warning went to the sender; 0: none yet
    journal_bytes: int = 0  # bytes of journal after the message when read; not written back
    size: int = field(default=0, compare=False)  # the message's size, as the header says (parse); not written back
    taken: float = field(default=0.0, compare=False)  # when a worker's attempt took it (the log's delays=); not written

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def copy_for(self, queue_id: str, arrival: float, recipients: list[Recipient]) -> QueueFile:
        """A new message of these recipients (pending, with their DSN fields), with this one's
        sender, bytes, ENVID and RET: a part split off, or the message handed to another spool."""
        return QueueFile(queue_id, arrival, self.sender,
                         [Recipient(r.address, notify=r.notify, orcpt=r.orcpt) for r in recipients],
                         self.message, envid=self.envid, ret=self.ret)

    def add_log(self, when: float, text: str) -> None:
        self.log = [*self.log, f"{when:.3f} {clean(text)}"][-LOG_KEEP:]

    def to_bytes(self) -> bytes:
        if self.warned or any(r.reported for r in self.recipients):
            version = REPORTS_VERSION
        else:
            version = CRASHES_VERSION if self.crashes else VERSION
        lines = [
            f"{MAGIC} {version}",
            f"id {self.queue_id}",
            f"arrival {self.arrival:.6f}",
            f"attempts {self.attempts}",
        ]
        if self.crashes:
            lines.append(f"crashes {self.crashes}")
        if self.warned:
            lines.append(f"warned {self.warned:.6f}")
        lines.append(f"sender <{self.sender}>")
        if self.envid:
            lines.append(f"envid {clean(self.envid)}")
        if self.ret:
            lines.append(f"ret {clean(self.ret)}")
        if self.rewritten:
            lines.append("rewritten yes")
        lines.extend(f"log {entry}" for entry in self.log)
        for rcpt in self.recipients:
            lines.extend(rcpt.header_lines())
        lines.append(f"size {len(self.message)}")
        return ("\n".join(lines) + "\n\n").encode() + self.message


def journal_record(index: int, rcpt: Recipient) -> bytes:
    """The journal lines that make `rcpt`'s result durable; `state` comes last on purpose.

    A crash may cut the append short. The reader applies only whole lines, and a group without
    its final `state` line changes no state, so the recipient is simply tried again.
    """
    lines = [f"@{index} {key} {clean(getattr(rcpt, key))}" for key in ("dsn", "relay", "reply")]
    lines.append(f"@{index} state {rcpt.state}")
    return ("\n".join(lines) + "\n").encode()


def parse(data: bytes, where: str = "queue file", *, header_only: bool = False) -> QueueFile:
    """Read a whole queue file; `where` (usually the path) prefixes every error. With
    `header_only`, `data` may end after the header: the message is left empty (its size is the
    `size` attribute) and the journal unread, for listing a queue without reading messages."""
    end = data.find(b"\n\n", 0, MAX_HEADER)
    if end < 0:
        raise CorruptQueueFile(f"{where}: no end of header (empty line) in the first {MAX_HEADER} bytes")
    try:
        header = data[:end].decode()
    except UnicodeDecodeError as exc:
        raise CorruptQueueFile(f"{where}: header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    fields: dict[str, str] = {}
    line_of: dict[str, str] = {}
    recipients: list[Recipient] = []
    log: list[str] = []
    version = VERSION
    for number, line in enumerate(header.split("\n"), 1):
        key, _, value = line.partition(" ")
        if number == 1:
            if key != MAGIC:
                raise CorruptQueueFile(f"{where}:1: not a queue file (expected '{MAGIC} {VERSION}')")
            if value not in map(str, VERSIONS):
                raise CorruptQueueFile(f"{where}:1: unsupported queue file version {value!r}")
            version = int(value)
        elif key == "rcpt":
            recipients.append(Recipient(_address(value, f"{where}:{number}", null_ok=False)))
        elif key in _NEWER_KEYS and version < _NEWER_KEYS[key]:
            raise CorruptQueueFile(f"{where}:{number}: '{key}' needs version {_NEWER_KEYS[key]} of the format, "
                                   f"the file says {version}")
        elif key in _RECIPIENT_KEYS:
            if not recipients:
                raise CorruptQueueFile(f"{where}:{number}: '{key}' before any 'rcpt' line")
            _set_recipient(recipients[-1], key, value, f"{where}:{number}")
        elif key == "log":
            log.append(value)
        elif key in _ENVELOPE_KEYS:
            if key in fields:
                raise CorruptQueueFile(f"{where}:{number}: '{key}' given twice")
            fields[key] = value
            line_of[key] = f"{where}:{number}"
        else:
            raise CorruptQueueFile(f"{where}:{number}: unknown key {key!r}")
    for key in ("id", "arrival", "sender", "size"):
        if key not in fields:
            raise CorruptQueueFile(f"{where}: required line '{key}' is missing")
    if not recipients:
        raise CorruptQueueFile(f"{where}: no 'rcpt' line")
    if fields.get("rewritten", "yes") != "yes":
        raise CorruptQueueFile(f"{line_of['rewritten']}: rewritten: {fields['rewritten']!r} is not 'yes'")
    if not is_queue_id(fields["id"]):
        raise CorruptQueueFile(f"{line_of['id']}: {fields['id']!r} is not a queue id")
    size = _number(fields["size"], int, f"{line_of['size']}: size")
    body_start = end + 2
    message = b"" if header_only else data[body_start:body_start + size]
    if len(message) != size and not header_only:
        raise CorruptQueueFile(f"{where}: truncated: size says {size} bytes, the file holds {len(message)}")
    queue_file = QueueFile(
        queue_id=fields["id"],
        arrival=_number(fields["arrival"], float, f"{line_of['arrival']}: arrival"),
        sender=_address(fields["sender"], f"{line_of['sender']}: sender", null_ok=True),
        recipients=recipients,
        message=message,
        attempts=_number(fields.get("attempts", "0"), int, f"{line_of.get('attempts', where)}: attempts"),
        envid=fields.get("envid", ""),
        ret=fields.get("ret", ""),
        rewritten="rewritten" in fields,
        log=log,
        crashes=_number(fields.get("crashes", "0"), int, f"{line_of.get('crashes', where)}: crashes"),
        warned=_number(fields.get("warned", "0"), float, f"{line_of.get('warned', where)}: warned"),
    )
    queue_file.size = size
    if not header_only:
        queue_file.journal_bytes = len(data) - body_start - size
        _apply_journal(queue_file, data[body_start + size:], where)
    return queue_file


def _apply_journal(queue_file: QueueFile, journal: bytes, where: str) -> None:
    """Apply whole journal lines; a torn last line (a crash during the append) is ignored."""
    lines = journal.split(b"\n")[:-1]
    staged: dict[int, dict[str, str]] = {}
    for line in lines:
        if line == CRASH_RECORD[:-1]:
            queue_file.crashes += 1
            continue
        if line == HELD_RECORD[:-1]:
            queue_file.crashes = 0
            continue
        match = _JOURNAL.fullmatch(line)
        if not match:
            raise CorruptQueueFile(f"{where}: bad journal line {line[:80]!r}")
        index, key, value = int(match[1]), match[2].decode(), match[3].decode(errors="replace")
        if index >= len(queue_file.recipients) or key not in _RECIPIENT_KEYS:
            raise CorruptQueueFile(f"{where}: bad journal line {line[:80]!r}")
        staged.setdefault(index, {})[key] = value
        if key == "state":
            for name, text in staged.pop(index).items():
                _set_recipient(queue_file.recipients[index], name, text, f"{where}: journal")


def journal_start(head: bytes) -> int | None:
    """Where the message ends and the journal starts, by the `size` line of the header at the
    start of `head`; None if `head` holds no complete header with one plain `size` line.

    This reads no more of the header than that: it serves the supervisor, which appends to a
    file a dead worker left without reading the message (see Spool.record_crash)."""
    end = head.find(b"\n\n", 0, MAX_HEADER)
    if end < 0 or not head.startswith(f"{MAGIC} ".encode()):
        return None
    sizes = [line[5:] for line in head[:end].split(b"\n") if line.startswith(b"size ")]
    if len(sizes) != 1 or not re.fullmatch(rb"[0-9]{1,18}", sizes[0]):
        return None
    return end + 2 + int(sizes[0])


def _set_recipient(rcpt: Recipient, key: str, value: str, where: str) -> None:
    if key == "state" and value not in STATES:
        raise CorruptQueueFile(f"{where}: unknown recipient state {value!r}")
    if key == "reported":
        if value != "yes":
            raise CorruptQueueFile(f"{where}: reported: {value!r} is not 'yes'")
        rcpt.reported = True
        return
    setattr(rcpt, key, value)


def _address(value: str, where: str, null_ok: bool) -> str:
    if not (value.startswith("<") and value.endswith(">")):
        raise CorruptQueueFile(f"{where}: address {value!r} is not in angle brackets")
    try:
        return parse_path(value, null_ok=null_ok)
    except AddressError as exc:
        raise CorruptQueueFile(f"{where}: {exc}") from None


def _number(text: str, kind: type, where: str):
    """Plain decimal digits only: int() and float() would also take "-1", "nan" or "1e9"."""
    try:
        if (_INTEGER if kind is int else _DECIMAL).fullmatch(text):
            return kind(text)
    except ValueError:  # more digits than int() converts
        pass
    raise CorruptQueueFile(f"{where}: {text!r} is not a number")
