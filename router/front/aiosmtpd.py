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
through. The addresses and the message are all that reaches the queue file; the MAIL and RCPT
parameters are not kept.

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

DSN parameters (RET, ENVID, NOTIFY, ORCPT) are not taken: aiosmtpd does not offer DSN.

aiosmtpd is not a dependency of qrouter. Install it next to qrouter to use this module
(`pip install aiosmtpd`, or Debian's python3-aiosmtpd); importing the module without it fails
with an ImportError that says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import Executor

try:
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
from router.spool.headers import prepend_fields
from router.spool.queue_file import clean
from router.spool.queue_id import new_queue_id
from router.spool.trace import peer_source, received

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
                 verify_fail: str = "open", verify_authenticated: bool = False) -> None:
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

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        try:
            parse_path(address, null_ok=True)
        except AddressError as exc:
            return f"553 5.1.7 {clean(str(exc))}"
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
        message = prepend_fields(envelope.original_content or b"", [trace])
        try:
            queue_id = await loop.run_in_executor(self.executor, self.enqueue, envelope.mail_from or "<>",
                                                  recipients, message, queue_id)
        except SpoolError as exc:
            if exc.temporary:
                return f"451 4.3.0 {clean(str(exc))}"
            # Addresses were checked at MAIL and RCPT, and aiosmtpd takes no DATA without a
            # recipient: what the spool refuses for good here is the size.
            return f"552 5.3.4 {clean(str(exc))}"
        return f"250 2.0.0 Queued as {queue_id}"

    def enqueue(self, sender: str, recipients: list[str], message: bytes, queue_id: str = "") -> str:
        """Queue one message durably (blocking: it fsyncs) and return its queue id (`queue_id`,
        made by new_queue_id() for a message that names it, or a new one)."""
        spool = Spool(self.queue_dir, self.group, size_limit=self.size_limit)
        try:
            return spool.enqueue(sender, recipients, message, queue_id=queue_id)
        finally:
            spool.close()


def _protocol(session: Session) -> str:
    """The with-part of the Received: field, as RFC 3848 names it: SMTP after HELO; ESMTP after
    EHLO, with S for TLS and A for an authenticated client."""
    if not session.extended_smtp:
        return "SMTP"
    return "ESMTP" + ("S" if session.ssl else "") + ("A" if session.authenticated else "")
