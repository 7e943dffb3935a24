"""`QueueHandler`: an aiosmtpd handler that queues every message it accepts into qrouter.

A Python SMTP server built on aiosmtpd becomes a qrouter front door with one line:

    from aiosmtpd.controller import Controller
    from router.front.aiosmtpd import QueueHandler

    Controller(QueueHandler("/var/spool/qrouter"), hostname="127.0.0.1", port=25).start()

At the end of DATA the envelope (the sender, `<>` for none, and the recipients in the order given)
and the message exactly as received (`envelope.original_content`, after dot-unstuffing, CRLF line
ends as on the wire) after a Received: field (router/spool/trace.py: the client's HELO name and address,
the server's host name, ESMTP or SMTP, the queue id) are queued with `Spool.enqueue`: the file is
fsynced before the client hears

    250 2.0.0 Queued as QUEUE-ID

The fsyncs run in an executor thread, so other sessions go on meanwhile. When the spool cannot take
the message (disk full, read-only, missing) the client hears `451 4.3.0 <reason>` and keeps it to
try again later; nothing is left half-written in the queue. Addresses are checked with the rules
every qrouter front door uses (router/spool/address.py): a sender that is not valid is refused at MAIL
(`553 5.1.7`), a recipient at RCPT (`553 5.1.3`), so the others of the transaction still go
through. The addresses and the message are what reaches the queue file; of the MAIL and RCPT
parameters only DSN's, with DSNServer (below).

`size_limit` is qrouter's message-size-limit (give the config's `message_size_limit`; default
100 MiB): a larger message, Received: field included, is refused at the end of DATA with
`552 5.3.4`. How much aiosmtpd
reads and buffers, and the SIZE it announces, is its own `data_size_limit` (32 MiB unless the
server sets it), the server's business: set it to at most `size_limit` so that a client hears of
the limit at MAIL FROM, and a larger message is not received only to be refused.

With `verify=True` every recipient is also checked at RCPT by the running qrouter daemon
(recipient verification, router/daemon/verifier.py: the rewriting, aliases, transports and DNS delivery
would use), so that what qrouter would bounce is refused there and no report goes to a forged
sender: `550` with qrouter's status code and text (`550 5.1.1 no alias for local part ...`, a
`queue/error` rule's text, `550 5.1.2`, `550 5.1.10`), `450` for a temporary verdict. Each refusal
is one line in the log (logger `qrouter`). When the daemon cannot be asked, the recipient is
accepted and a warning logged (`verify_fail="open"`, the default) or it hears `451 4.3.0`
(`"closed"`). `status_socket` is the daemon's (the config's `status-socket`; default
QUEUE-DIR/status.sock). Authenticated sessions are not checked unless `verify_authenticated`:
their senders are real, and they hear about their mistakes from the report.

DSN parameters (RET, ENVID, NOTIFY, ORCPT, RFC 3461) are taken only by a server made with
`DSNServer` (aiosmtpd's SMTP, which refuses them, with DSN announced and taken): build it with
`QueueController` in place of aiosmtpd's Controller. They are checked by the rules of
router/spool/dsn.py (`501 5.5.4` for a bad one), kept in the queue file and go on with the message,
as from the qpsmtpd plugin.

While the spool is being drained to a peer (`qrouter drain`, router/spool/drain.py) every MAIL
hears `421 4.3.2` and the reason: the client takes its mail to another node. Every
`X-Qrouter-Arrival:` field (router/spool/trace.py) is taken out of the header of a message; the
first one gives the message its arrival for max-age when the client's address is one of `peers`
(the config's `cluster-peers`), the nodes that drain into this one.

aiosmtpd is not a dependency of qrouter. Install it next to qrouter to use this module
(`pip install aiosmtpd`, or Debian's python3-aiosmtpd); importing the module without it fails
with an ImportError that says so.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import re
from collections.abc import Iterable
from concurrent.futures import Executor

try:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, Envelope, Session
except ImportError as exc:
    raise ImportError(
        "router.front.aiosmtpd needs the aiosmtpd package, which qrouter does not install itself: "
        "pip install aiosmtpd (or apt install python3-aiosmtpd)", name=exc.name) from exc

from policy.verify import DELIVERABLE
from router.daemon.status_socket import StatusError
from router.daemon.verifier import VerifyError, ask
from router.spool import DEFAULT_SIZE_LIMIT, Spool, SpoolError
from router.spool.address import AddressError, parse_path
from router.spool.drain import read_drain
from router.spool.dsn import MAIL_PARAMETERS, RCPT_PARAMETERS, DSNParameterError, twice
from router.spool.dsn import take as take_dsn
from router.spool.headers import prepend_fields
from router.spool.queue_file import Recipient, clean
from router.spool.queue_id import new_queue_id
from router.spool.trace import peer_source, received, take_arrival

log = logging.getLogger("qrouter")
CANNOT_VERIFY = "451 4.3.0 Cannot verify the recipient now, try again later"


class QueueHandler:
    """Queue into the spool at `queue_dir`. `group` is the config's spool-group, if any (files are
    then made 0660, for a server that runs as a member of that group). `size_limit` is the
    config's message-size-limit in bytes. `executor` runs the writes and the questions to the
    daemon (default: the event loop's default thread pool). `verify` and the settings after it:
    recipient verification (above)."""

    def __init__(self, queue_dir: str | os.PathLike, *, group: str = "", size_limit: int = DEFAULT_SIZE_LIMIT,
                 executor: Executor | None = None, verify: bool = False, status_socket: str = "",
                 verify_fail: str = "open", verify_authenticated: bool = False, peers: Iterable[str] = ()) -> None:
        if verify_fail not in ("open", "closed"):
            raise ValueError(f"verify_fail must be 'open' or 'closed', not {verify_fail!r}")
        self.queue_dir = queue_dir
        self.group = group
        self.size_limit = size_limit
        self.executor = executor
        self.verify = verify
        self.status_socket = status_socket or os.path.join(queue_dir, "status.sock")
        self.verify_closed = verify_fail == "closed"
        self.verify_authenticated = verify_authenticated
        self.peers = frozenset(str(ipaddress.ip_address(peer)) for peer in peers)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if isinstance(server, DSNServer):
            responses.insert(-1, "250-DSN")
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        try:
            parse_path(address, null_ok=True)
        except AddressError as exc:
            return f"553 5.1.7 {clean(str(exc))}"
        drain = read_drain(self.queue_dir)
        if drain is not None:
            return f"421 {clean(drain.refusal())}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        try:
            recipient = parse_path(address)
        except AddressError as exc:
            return f"553 5.1.3 {clean(str(exc))}"
        if self.verify and (self.verify_authenticated or not session.authenticated):
            refusal = await self._verified(recipient, envelope.mail_from or "")
            if refusal:
                return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient ok"

    async def _verified(self, recipient: str, sender: str) -> str | None:
        """The reply that refuses `recipient`, or None to take it, as the daemon judges it."""
        loop = asyncio.get_running_loop()
        try:
            verdict = await loop.run_in_executor(self.executor, ask, self.status_socket, recipient, sender)
        except (StatusError, VerifyError) as exc:
            if self.verify_closed:
                log.warning("cannot verify recipient <%s>: %s; refused for now (verify_fail closed)", recipient, exc)
                return CANNOT_VERIFY
            log.warning("cannot verify recipient <%s>: %s; accepted (verify_fail open)", recipient, exc)
            return None
        if verdict.result == DELIVERABLE:
            return None
        reply = clean(verdict.reply())
        log.info("refused recipient <%s>: %s", recipient, reply)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        loop = asyncio.get_running_loop()
        queue_id, recipients = new_queue_id(), list(envelope.rcpt_tos)
        peer = session.peer[0] if isinstance(session.peer, tuple) else ""  # "" on a unix socket
        trace = received(server.hostname, queue_id, recipients, source=peer_source(session.host_name, peer),
                         protocol=_protocol(session))
        arrival, content = take_arrival(envelope.original_content or b"")
        message = prepend_fields(content, [trace])
        dsn = getattr(envelope, "dsn", {})
        try:
            queue_id = await loop.run_in_executor(
                self.executor, functools.partial(
                    self.enqueue, envelope.mail_from or "<>", _with_dsn(recipients, getattr(envelope, "rcpt_dsn", [])),
                    message, queue_id, arrival=arrival if peer in self.peers else None,
                    envid=dsn.get("ENVID", ""), ret=dsn.get("RET", "")))
        except SpoolError as exc:
            if exc.temporary:
                return f"451 4.3.0 {clean(str(exc))}"
            # Addresses were checked at MAIL and RCPT, and aiosmtpd takes no DATA without a
            # recipient: what the spool refuses for good here is the size.
            return f"552 5.3.4 {clean(str(exc))}"
        return f"250 2.0.0 Queued as {queue_id}"

    def enqueue(self, sender: str, recipients: list[str | Recipient], message: bytes, queue_id: str = "", *,
                arrival: float | None = None, envid: str = "", ret: str = "") -> str:
        """Queue one message durably (blocking: it fsyncs) and return its queue id (`queue_id`,
        made by new_queue_id() for a message that names it, or a new one)."""
        spool = Spool(self.queue_dir, self.group, size_limit=self.size_limit)
        try:
            return spool.enqueue(sender, recipients, message, queue_id=queue_id, arrival=arrival, envid=envid, ret=ret)
        finally:
            spool.close()


def _protocol(session: Session) -> str:
    """The with-part of the Received: field, as RFC 3848 names it: SMTP after HELO; ESMTP after
    EHLO, with S for TLS and A for an authenticated client."""
    if not session.extended_smtp:
        return "SMTP"
    return "ESMTP" + ("S" if session.ssl else "") + ("A" if session.authenticated else "")


class DSNServer(SMTP):
    """aiosmtpd's SMTP server with DSN (RFC 3461): RET and ENVID at MAIL, NOTIFY and ORCPT at
    RCPT are taken off the command before aiosmtpd reads it (it refuses them, and upper-cases
    what it keeps), checked and put in the queue file's form by router/spool/dsn.py (a bad one
    is refused with 501 5.5.4; one at the other command is left to aiosmtpd's 555), and kept on
    the envelope for QueueHandler: `envelope.dsn` ({"RET": ..., "ENVID": ...}) and
    `envelope.rcpt_dsn` (NOTIFY, ORCPT of each recipient taken)."""

    async def smtp_MAIL(self, arg: str | None) -> None:
        try:
            rest, found = _take_dsn(arg, MAIL_PARAMETERS)
        except DSNParameterError as exc:
            await self.push(exc.reply)
            return
        had = self.envelope is not None and self.envelope.mail_from is not None
        await super().smtp_MAIL(rest)
        if self.envelope is not None and self.envelope.mail_from is not None and not had:
            self.envelope.dsn = found  # type: ignore[attr-defined]
            self.envelope.rcpt_dsn = []  # type: ignore[attr-defined]

    async def smtp_RCPT(self, arg: str | None) -> None:
        try:
            rest, found = _take_dsn(arg, RCPT_PARAMETERS)
        except DSNParameterError as exc:
            await self.push(exc.reply)
            return
        taken = len(self.envelope.rcpt_tos) if self.envelope is not None else 0
        await super().smtp_RCPT(rest)
        if self.envelope is not None and len(self.envelope.rcpt_tos) > taken:
            self.envelope.rcpt_dsn = [*getattr(self.envelope, "rcpt_dsn", []), found]  # type: ignore[attr-defined]


class QueueController(Controller):
    """aiosmtpd's Controller serving with DSNServer: a front door that keeps DSN parameters."""

    def factory(self) -> SMTP:
        return DSNServer(self.handler, **self.SMTP_kwargs)


_DSN_PARAMETER = re.compile(r"\s+(RET|ENVID|NOTIFY|ORCPT)(?:=(\S*))?(?=\s|$)", re.IGNORECASE)


def _take_dsn(arg: str | None, names: tuple[str, ...]) -> tuple[str | None, dict[str, str]]:
    """The command's argument without the DSN parameters `names`, and their values as the queue
    file keeps them (router/spool/dsn.py); DSNParameterError for a bad one or one given twice.
    The others are left for aiosmtpd, which refuses them (555)."""
    if arg is None:
        return None, {}
    found: dict[str, str] = {}

    def take(match: re.Match[str]) -> str:
        name = match[1].upper()
        if name not in names:
            return match[0]
        if name in found:
            raise twice(name)
        found[name] = take_dsn(name, match[2] or "")
        return ""

    return _DSN_PARAMETER.sub(take, arg), found


def _with_dsn(recipients: list[str], dsn: list[dict[str, str]]) -> list[str | Recipient]:
    """Each recipient with its NOTIFY and ORCPT, when the client gave any."""
    if len(dsn) != len(recipients):
        return list(recipients)
    return [Recipient(address, notify=found.get("NOTIFY", ""), orcpt=found.get("ORCPT", "")) if found else address
            for address, found in zip(recipients, dsn, strict=True)]
