"""`qrouter-sendmail` (also `qrouter sendmail`): the sendmail command line, queueing into the spool.

cron, mailx, logwatch and other local programs hand mail to `/usr/sbin/sendmail`; an administrator
who wants it to go through qrouter links that name to `qrouter-sendmail`. The options are the ones
these programs use, read as Postfix's sendmail reads them:

    -t              also take recipients from the To:, Cc: and Bcc: header fields, and take the
                    Bcc: fields (with their continuation lines) out of the message. Recipients on
                    the command line are added, not removed. Without -t the header is not read.
    -i, -oi         a line holding a single "." is message text. Without them such a line ends
                    the message, as in sendmail; whatever follows it is read and thrown away.
    -f SENDER       the envelope sender (also -fSENDER, and the old -r); "" or "<>" for none.
                    Default: the invoking user (by real uid) at `me`, e.g. root@mail.example.org.
    -F NAME         the sender's full name, for the From: field added when the message has none.
    -N DSN          NOTIFY for every recipient: never, or success,delay,failure in any mix
    -R RET          full or hdrs;  -V ENVID  the envelope id (RFC 3461)
    -v              report the queue id on standard error
    --queue-dir DIR, --config FILE   where the spool is; without --config the file named by
                    $QROUTER_CONFIG is read, else /etc/qrouter/qrouter.conf if it exists, so a
                    /usr/sbin/sendmail link finds the daemon's spool. Only the keys queue-dir, me,
                    spool-group and message-size-limit are read from it: a user's cron job must
                    not fail on a file (relay-auth) that only root may read.

Accepted and ignored, as Postfix does: -bm, -n, -m, -U, -G, -B TYPE, -h HOPS, -om, -o7, -o8,
-od<mode> (delivery mode: mail is always queued for the daemon) and -oe<mode> (errors are always
reported by exit code). Any other option, and the other -b modes (-bp, -bs...), is a usage error.

Addresses are read as RFC 5322 address lists, on the command line as in the header: `a@x, b@y`,
`Name <a@x>`, groups and comments are understood, and quoted strings and domain literals are
read whole (`"a:b"@x`, `a@[IPv6:::1]`). A group name (before `:`) must be words and quoted
strings: an address is never taken for one. Each address is then checked as every front door
checks it (router/spool/address.py). An address without a domain (`root`) gets
`@me`, the host name qrouter uses for itself (the `me` config key, /etc/qpsmtpd/me, else the
FQDN unless it is localhost, else the host name), as Postfix appends `@$myorigin`. The same
recipient given twice is queued once.
CR, LF and NUL are refused in every argument and in the To:, Cc: and Bcc: fields -t reads.

The message is read up to message-size-limit bytes (config key, default 100 MiB); a larger one
is refused, not read to its end. As Postfix's pickup and cleanup do for local submissions, a
`Received: by ME (qrouter, from userid UID) id QUEUE-ID` field (router/spool/trace.py: it also names a
lone recipient) is put first, and a missing From: (the envelope sender, else the invoking user at
`me`, with the -F name), Date: or Message-ID: (<QUEUE-ID@me>) is added after it; otherwise the
message is queued byte for byte, but for the Bcc: fields -t takes out. A spool that does not
exist yet (the daemon never started) is made, as `qrouter enqueue` makes it.

Nothing is printed on success. Exit codes (sysexits): 0 queued; 64 bad arguments, an address that
is not valid, no recipients, or a message larger than message-size-limit; 75 the spool cannot take
the message now (the caller keeps it and may try again); 78 the config file cannot be used. Every
failure says why on standard error, and none leaves anything in the queue.

The spool is writable by root and by the `spool-group` only: other users who should send mail
through this command need to be in that group.
"""

from __future__ import annotations

import email.utils
import getopt
import os
import pwd
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from router import config as config_module
from router.config import Config, ConfigError
from router.spool import INCOMING, Spool, SpoolError, trace
from router.spool.address import AddressError, has_cr_lf_nul, parse_path
from router.spool.address_list import WORDS, AddressListError, Token, tokens
from router.spool.headers import LINE, header_fields, message_fields, prepend_fields
from router.spool.queue_id import arrival_of, new_queue_id

EX_OK, EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 0, 64, 75, 78
DEFAULT_CONFIG = "/etc/qrouter/qrouter.conf"
SPOOL_KEYS = ("queue-dir", "me", "spool-group", "message-size-limit")

USAGE = ("usage: qrouter-sendmail [-t] [-i] [-f sender] [-F name] [-N dsn] [-R full|hdrs] [-V envid] [-v]\n"
         "                        [--queue-dir DIR] [--config FILE] [recipient ...] < message")

_SHORT_OPTIONS = "tivnmUGf:r:F:o:b:N:R:V:B:h:"
_LONG_OPTIONS = ["queue-dir=", "config=", "help"]
_NOTIFY = re.compile(r"never|(?:success|delay|failure)(?:,(?:success|delay|failure))*")
_LONE_DOT = re.compile(rb"^\.\r?(?:\n|\Z)", re.MULTILINE)
_RECIPIENT_FIELDS = ("to", "cc", "bcc")
_CHUNK = 1 << 16  # bytes read from standard input at a time


class UsageError(Exception):
    """Arguments or addresses that cannot be used; the message says which."""


@dataclass
class Invocation:
    """What the command line asks for."""

    recipients: list[str] = field(default_factory=list)
    sender: str | None = None  # None: the invoking user at `me`
    full_name: str = ""  # -F
    extract: bool = False  # -t
    lone_dot_ends: bool = True  # no -i / -oi
    notify: str = ""
    ret: str = ""
    envid: str = ""
    verbose: bool = False
    queue_dir: str | None = None
    config: str | None = None
    help: bool = False


def parse_args(argv: list[str]) -> Invocation:
    """Read sendmail's options; options and recipients may come in any order, `--` ends options."""
    try:
        options, recipients = getopt.gnu_getopt(argv, _SHORT_OPTIONS, _LONG_OPTIONS)
    except getopt.GetoptError as exc:
        raise UsageError(str(exc)) from None
    result = Invocation(recipients=recipients)
    for option, value in options:
        refuse_cr_lf_nul(option, value)  # recipients are checked by address_list
        if option in ("-f", "-r"):
            result.sender = value
        elif option == "-t":
            result.extract = True
        elif option == "-i":
            result.lone_dot_ends = False
        elif option == "-o":
            _sendmail_option(value, result)
        elif option == "-b":
            if value != "m":
                raise UsageError(f"-b{value} is not supported: qrouter-sendmail only queues mail (-bm)")
        elif option == "-N":
            if not _NOTIFY.fullmatch(value.lower().replace(" ", "")):
                raise UsageError(f"-N {value!r}: give never, or success, delay and failure separated by commas")
            result.notify = value.upper().replace(" ", "")
        elif option == "-R":
            if value.lower() not in ("full", "hdrs"):
                raise UsageError(f"-R {value!r}: give full or hdrs")
            result.ret = value.upper()
        elif option == "-V":
            if not value or not all("!" <= c <= "~" for c in value) or len(value) > 100:
                raise UsageError(f"-V {value!r}: an envelope id is 1 to 100 printable ASCII characters")
            result.envid = value
        elif option == "-v":
            result.verbose = True
        elif option == "--queue-dir":
            result.queue_dir = value
        elif option == "--config":
            result.config = value
        elif option == "--help":
            result.help = True
        elif option == "-F":
            result.full_name = value
        # -n, -m, -U, -G, -B and -h are accepted and change nothing here.
    return result


def _sendmail_option(value: str, result: Invocation) -> None:
    """sendmail's -oX: -oi means -i; the rest that callers use are about delivery and error modes
    qrouter does not have (it always queues and always answers by exit code)."""
    if value == "i":
        result.lone_dot_ends = False
    elif value in ("m", "7", "8") or (value[:1] in ("d", "e") and len(value) > 1):
        pass
    else:
        raise UsageError(f"-o{value} is not supported")


def read_message(stdin: BinaryIO, limit: int, lone_dot_ends: bool) -> bytes:
    """The message on `stdin`, up to a lone dot line if `lone_dot_ends`; UsageError if it is
    larger than `limit` bytes (message-size-limit). Never more than limit + 3 bytes are read
    into memory: enough to see whole a lone dot line (".\\r\\n") that starts within the limit."""
    data = read_up_to(stdin, limit + 3)
    message = cut_at_lone_dot(data) if lone_dot_ends else data
    if len(message) > limit:
        raise UsageError(f"message is larger than message-size-limit ({limit} bytes)")
    while stdin.read(_CHUNK):  # what follows a lone dot is read and thrown away
        pass
    return message


def read_up_to(stdin: BinaryIO, size: int) -> bytes:
    """`size` bytes, fewer only at the end of the input. Read in chunks: read(size) would make
    room for all `size` bytes first, the whole limit for a message of a few lines."""
    chunks: list[bytes] = []
    while size > 0 and (chunk := stdin.read(min(size, _CHUNK))):
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def cut_at_lone_dot(data: bytes) -> bytes:
    """The message as sendmail without -i reads it: up to the first line that is just "."."""
    match = _LONE_DOT.search(data)
    return data[:match.start()] if match else data


def extract(message: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """For -t: the addresses of To:, Cc: and Bcc: in header order, each with the field it came
    from ("To: header"), and the message with every Bcc: field (first line and continuation
    lines) taken out, all else byte for byte."""
    lines = LINE.findall(message)
    fields = header_fields(lines)
    addresses: list[tuple[str, str]] = []
    for f in fields:
        if f.name in _RECIPIENT_FIELDS:
            where = f"{f.name.capitalize()}: header"
            addresses += [(where, a) for a in address_list(f.value, where)]
    dropped = {i for f in fields if f.name == "bcc" for i in range(f.first, f.end)}
    if not dropped:
        return addresses, message
    return addresses, b"".join(line for i, line in enumerate(lines) if i not in dropped)


def address_list(text: str, where: str = "address list") -> list[str]:
    """The addresses of an RFC 5322 address list, in order, without display names, comments and
    group names; `where` names the list in messages ("recipient", "To: header").

    This only splits the list: whether an address is valid is parse_path's business, and each
    address is the text as written from its first token to its last. Quoted strings, domain
    literals and comments are read whole, so the `:` and `,` of `"a:b"@x` or `a@[IPv6:::1]` stay
    in the address. A group name (before `:`) must be a phrase, words and quoted strings, so that
    addresses are never dropped as one; a display name (before `<`) is dropped whatever it is, as
    mail readers do (`a@x <a@x>` is common). CR, LF or NUL anywhere, or an entry that is not one
    address, raises UsageError (not guessed at)."""
    refuse_cr_lf_nul(where, text)
    reader = _ListReader(text, where)
    try:
        found = tokens(text)
    except AddressListError as exc:
        raise UsageError(reader.bad(str(exc))) from None
    for token in found:
        reader.take(token)
    reader.end_entry()
    return reader.addresses


class _ListReader:
    """address_list's state between tokens: the addresses read and the entry being read."""

    def __init__(self, text: str, where: str) -> None:
        self.text, self.where = text, where
        self.addresses: list[str] = []
        self.outside: list[Token] = []  # the entry's tokens outside <...>
        self.angle: list[Token] | None = None  # its tokens inside <...>, once it has one
        self.closed = False  # its '>' has been read

    def take(self, token: Token) -> None:
        if self.angle is not None and not self.closed:
            if token.kind == ">":
                self.closed = True
            else:
                self.angle.append(token)  # parse_path judges all between < and >
        elif token.kind == "<":
            if self.angle is not None:
                raise UsageError(self.bad("two <addresses> in one entry"))
            self.angle = []
        elif token.kind in (",", ";"):
            self.end_entry()
        elif token.kind == ":":
            if self.angle is not None:
                raise UsageError(self.bad("':' after <address>"))
            if not all(t.kind in WORDS for t in self.outside):
                raise UsageError(self.bad(f"group name {self._written(self.outside)!r} is not a phrase (words and "
                                          "quoted strings): an address or a ',' missing?"))
            self.outside.clear()  # the group's members follow
        elif self.closed:
            raise UsageError(self.bad("text after '>'"))
        else:
            self.outside.append(token)

    def end_entry(self) -> None:
        if self.angle is not None and not self.closed:
            raise UsageError(self.bad("'<' without '>'"))
        if self.outside or self.angle is not None:  # "<>" is kept, for check() to refuse by name
            self.addresses.append(self._written(self.outside if self.angle is None else self.angle))
        self.outside.clear()
        self.angle, self.closed = None, False

    def _written(self, tokens: list[Token]) -> str:
        """The text from the first token to the last, as written (empty without tokens)."""
        return self.text[tokens[0].start:tokens[-1].end] if tokens else ""

    def bad(self, problem: str) -> str:
        return _bad(self.where, self.text, problem)


def _bad(where: str, text: str, problem: str) -> str:
    return f"{where} {text!r}: {problem}"


def refuse_cr_lf_nul(where: str, text: str) -> None:
    """UsageError naming `where` (an option, a header field) if `text` holds CR, LF or NUL:
    what comes after them could be read as another queue file line or SMTP command."""
    if has_cr_lf_nul(text):
        raise UsageError(_bad(where, text, "contains CR, LF or NUL"))


def qualify(address: str, me: Callable[[], str]) -> str:
    """`user` becomes `user@me`; anything with a domain is left as it is."""
    at = address.rfind("@")
    return address if at >= 0 and at > address.rfind('"') else f"{address}@{me()}"


def check(address: str, me: Callable[[], str], *, sender: bool = False, where: str = "") -> str:
    """A recipient (or the sender) qualified and checked; UsageError, naming `where` the address
    came from, if it is not valid."""
    text = address.strip()
    if sender and text in ("", "<>"):
        return ""
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    try:
        if not text:
            raise AddressError("the null address <> is only valid as a sender (-f '<>')")
        return parse_path(qualify(text, me))
    except AddressError as exc:
        raise UsageError(f"{where}: {exc}" if where else str(exc)) from None


def spool_config(path: str | None, queue_dir: str | None) -> Config:
    """The keys this command needs (SPOOL_KEYS) from the config file, with --queue-dir winning.

    The file is `path`, else $QROUTER_CONFIG, else DEFAULT_CONFIG if it exists, else none (the
    defaults). It is read as `qrouter run` reads it; the other keys are skipped unread."""
    if path is None:
        path = os.environ.get("QROUTER_CONFIG") or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    return config_module.load(path, {"queue-dir": queue_dir} if queue_dir is not None else {}, only=SPOOL_KEYS)


def invoking_user() -> str:
    """The login name of the real uid, as Postfix takes it; the number if it has none."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def queue_local(loaded: Config, sender: str, recipients: list[str], build: Callable[[str], bytes],
                **options: str) -> str:
    """Queue a message submitted on this host (`qrouter enqueue`, qrouter-sendmail) and return
    its queue id; SpoolError otherwise, temporary for a failure of the disk.

    The spool is made first if the daemon has not made it yet: mail from cron on a freshly
    installed host must not end in dead.letter because qrouter has never run. `build` makes the
    message from its queue id, which the Received: field names. `options` are Spool.enqueue's
    DSN keywords (notify, envid, ret)."""
    spool = Spool(loaded.queue_dir, loaded.spool_group, size_limit=loaded.message_size_limit)
    try:
        if not os.path.isdir(spool.path(INCOMING)):
            spool.create()
        queue_id = new_queue_id()
        return spool.enqueue(sender, recipients, build(queue_id), queue_id=queue_id, **options)
    except OSError as exc:
        raise SpoolError(f"cannot queue into {loaded.queue_dir}: {exc.strerror or exc}", temporary=True) from None
    finally:
        spool.close()


def received(hostname: str, queue_id: str, recipients: list[str]) -> str:
    """The trace field Postfix's pickup writes for a local submission: who submitted it (the
    real uid), on which host, under which queue id and when (its arrival)."""
    return trace.received(hostname, queue_id, recipients, note=f"from userid {os.getuid()}")


def missing_fields(message: bytes, author: str, hostname: str, queue_id: str) -> list[str]:
    """From:, Date: and Message-ID: for a message without them, as Postfix's cleanup adds them
    to local submissions: mail from cron and scripts often has none, and receivers may refuse
    or mark such mail. `author` is the From: value."""
    present = {f.name for f in message_fields(message)}
    candidates = {"from": f"From: {author}",
                  "date": f"Date: {email.utils.formatdate(arrival_of(queue_id), localtime=True)}",
                  "message-id": f"Message-ID: <{queue_id}@{hostname}>"}
    return [text for name, text in candidates.items() if name not in present]


def submit(argv: list[str], stdin: BinaryIO | None = None, stderr: TextIO | None = None,
           prog: str = "qrouter-sendmail") -> int:
    """Queue one message as `sendmail ARGV < STDIN` would; returns the exit code."""
    stdin = stdin or sys.stdin.buffer
    stderr = stderr or sys.stderr

    def fail(message: str, code: int) -> int:
        print(f"{prog}: {message}", file=stderr)
        return code

    try:
        invocation = parse_args(argv)
    except UsageError as exc:
        return fail(f"{exc}\n{USAGE}", EX_USAGE)
    if invocation.help:
        print(f"{USAGE}\n\n{__doc__.split(chr(10) * 2, 1)[1].rstrip()}" if __doc__ else USAGE)
        return EX_OK
    if not invocation.recipients and not invocation.extract:
        return fail(f"no recipients given (name them, or use -t to read them from the header)\n{USAGE}",
                    EX_USAGE)
    try:
        loaded = spool_config(invocation.config, invocation.queue_dir)
    except ConfigError as exc:
        return fail(str(exc), EX_CONFIG)
    hostname: list[str] = []

    def me() -> str:  # looked up once, when first needed
        if not hostname:
            hostname.append(loaded.hostname)
        return hostname[0]

    try:
        if invocation.sender is None:
            sender = check(invoking_user(), me, sender=True, where="sender (the invoking user)")
        else:
            sender = check(invocation.sender, me, sender=True, where="sender (-f)")
        recipients = [check(a, me, where="recipient") for arg in invocation.recipients
                      for a in address_list(arg, "recipient")]
        message = read_message(stdin, loaded.message_size_limit, invocation.lone_dot_ends)
        if invocation.extract:
            found, message = extract(message)
            recipients += [check(a, me, where=where) for where, a in found]
        recipients = list(dict.fromkeys(recipients))
        if not recipients:
            raise UsageError("no recipients: none given and none in To:, Cc: or Bcc:")
        author = email.utils.formataddr(
            (invocation.full_name, sender or check(invoking_user(), me, where="From: (the invoking user)")))
    except UsageError as exc:
        return fail(str(exc), EX_USAGE)

    def build(queue_id: str) -> bytes:
        return prepend_fields(message, [received(me(), queue_id, recipients),
                                        *missing_fields(message, author, me(), queue_id)])

    try:
        queue_id = queue_local(loaded, sender, recipients, build, notify=invocation.notify,
                               envid=invocation.envid, ret=invocation.ret)
    except SpoolError as exc:
        return fail(str(exc), EX_TEMPFAIL if exc.temporary else EX_USAGE)
    if invocation.verbose:
        print(f"{prog}: queued as {queue_id}", file=stderr)
    return EX_OK


def main() -> None:
    """The `qrouter-sendmail` console script."""
    sys.exit(submit(sys.argv[1:], prog=os.path.basename(sys.argv[0]) or "qrouter-sendmail"))
