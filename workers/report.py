"""Reports to the sender of a message: non-delivery, delay and success notices.

A report is a message of its own (RFC 6522 multipart/report, report-type delivery-status): a
text part a person can read, a message/delivery-status part a program can (RFC 3464), and the
original message, or only its header (RET=HDRS, a message larger than bounce-size-limit, and
every delay warning: as Postfix, and as RFC 3461 suggests, a sender told that mail is still
being tried needs to know which message, not a second copy of it).
A message with an address that is not ASCII gets the RFC 6533 forms (message/global-delivery-
status, message/global). The report's envelope sender is <>, so that no report is ever made
about a report: a mail loop cannot start here.

This module only builds the bytes; workers/delivery.py decides when, and queues them.
"""

from __future__ import annotations

import email.utils
import re
import textwrap
import uuid
from dataclasses import dataclass

from router.spool.headers import header_of, message_fields
from router.spool.queue_file import Recipient

FAILED, DELAYED, DELIVERED, RELAYED = "failed", "delayed", "delivered", "relayed"
FAILURE, DELAY, SUCCESS = "FAILURE", "DELAY", "SUCCESS"

_SAID = re.compile(r"host (?P<host>[^\s\[]+)\[[^\]]*\](?::\d+)? said: (?P<reply>.*?)(?: \(in reply to [^)]*\))?$")
_SUBJECTS = {FAILED: "Undelivered Mail Returned to Sender", DELAYED: "Delayed Mail (still being retried)",
             DELIVERED: "Successful Mail Delivery Report", RELAYED: "Successful Mail Delivery Report"}


@dataclass(frozen=True)
class Notice:
    """One recipient in a report, and what became of it (the DSN Action)."""

    recipient: Recipient
    action: str


def wants(rcpt: Recipient, what: str) -> bool:
    """Whether the recipient's DSN NOTIFY asks for this kind of report. No NOTIFY means FAILURE
    and DELAY, as Postfix takes it (RFC 3461 leaves it to the MTA); NEVER means none."""
    notify = [word.strip() for word in rcpt.notify.upper().split(",") if word.strip()]
    return what in notify if notify else what in (FAILURE, DELAY)


def build(*, queue_id: str, arrival: float, sender: str, envid: str, ret: str, message: bytes,
          notices: list[Notice], me: str, to: str, now: float, size_limit: int,
          retry_until: float = 0.0) -> bytes:
    """The report about `notices` of the message `queue_id`, addressed to `to`."""
    boundary = f"{queue_id}.{uuid.uuid4().hex}/{me}"
    original = message.replace(b"\r\n", b"\n")
    unicode = any(not address.isascii() for address in (sender, to, *(n.recipient.address for n in notices)))
    actions = {notice.action for notice in notices}
    main = FAILED if FAILED in actions else DELAYED if DELAYED in actions else notices[0].action
    headers_only = ret.upper() == "HDRS" or len(message) > size_limit or main == DELAYED
    fields = [
        f"From: Mail Delivery System <MAILER-DAEMON@{me}>",
        f"To: <{to}>",
        f"Subject: {_SUBJECTS[main]}",
        f"Date: {email.utils.formatdate(now, localtime=True)}",
        f"Message-ID: <{uuid.uuid4().hex}.{queue_id}@{me}>",
        *_thread_fields(original),
        "Auto-Submitted: auto-replied",
    ]
    failed = [n.recipient.address for n in notices if n.action == FAILED]
    if failed:
        fields.append(f"X-Failed-Recipients: {', '.join(failed)}")
    fields += ["MIME-Version: 1.0",
               f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"']
    status_type = "message/global-delivery-status" if unicode else "message/delivery-status"
    if headers_only:
        returned = header_of(original).rstrip(b"\n") + b"\n"
        returned_type = "message/global-headers" if unicode else "text/rfc822-headers"
    else:
        returned_type, returned = ("message/global" if unicode else "message/rfc822"), original
    description = ("Undelivered Message" if main == FAILED else "Message") + (" Headers" if headers_only else "")
    text = _text(main, notices, me, headers_only).encode()
    status = _delivery_status(queue_id, arrival, envid, notices, me, now, retry_until, unicode).encode()
    parts = [
        (f"Content-Description: Notification\nContent-Type: text/plain; "
         f"charset={'us-ascii' if text.isascii() else 'utf-8'}\nContent-Transfer-Encoding: {_encoding(text)}", text),
        (f"Content-Description: Delivery report\nContent-Type: {status_type}\n"
         f"Content-Transfer-Encoding: {_encoding(status)}", status),
        (f"Content-Description: {description}\nContent-Type: {returned_type}\n"
         f"Content-Transfer-Encoding: {_encoding(returned)}", returned),
    ]
    body = b"This is a MIME-encapsulated message.\n\n"
    for head, content in parts:
        body += f"--{boundary}\n{head}\n\n".encode() + content + b"\n"  # that newline is the boundary's
    body += f"--{boundary}--\n".encode()
    return "\n".join(fields).encode() + b"\n\n" + body


def _thread_fields(original: bytes) -> list[str]:
    """In-Reply-To: and References: pointing at the original's Message-ID, when it has one."""
    ids = [f.value for f in message_fields(original) if f.name == "message-id"]
    return [f"In-Reply-To: {ids[0]}", f"References: {ids[0]}"] if ids and "\n" not in ids[0] else []


def _encoding(content: bytes) -> str:
    if any(len(line) > 998 for line in content.split(b"\n")) or b"\0" in content:
        return "binary"
    return "7bit" if content.isascii() else "8bit"


def _text(main: str, notices: list[Notice], me: str, headers_only: bool) -> str:
    attached = "Its header is attached below." if headers_only else "It is attached below."
    opening = {
        FAILED: f"I'm sorry to have to tell you that your message could not be delivered to one or more\n"
                f"recipients. {attached}",
        DELAYED: "Your message could not be delivered yet to one or more recipients. It is still in\n"
                 "the queue and will be tried again: you do not need to send it again now. This is a\n"
                 f"warning only; you will hear again if it cannot be delivered in the end. {attached}",
    }.get(main, f"Your message was delivered to the recipients below, as you asked. {attached}")
    lines = [f"This is the mail system at host {me}.", "", opening, ""]
    if main == FAILED:
        lines += ["For further assistance, please send mail to postmaster, and include this report.", ""]
    for notice in notices:
        rcpt = notice.recipient
        lines += [f"<{rcpt.address}>: {notice.action}" + (f" ({rcpt.dsn})" if rcpt.dsn else ""),
                  *(f"    {line}" for line in textwrap.wrap(" ".join((rcpt.reply or "no reason recorded").split()), 72,
                                                        break_long_words=False, break_on_hyphens=False)), ""]
    return "\n".join(lines)


def _delivery_status(queue_id: str, arrival: float, envid: str, notices: list[Notice], me: str, now: float,
                     retry_until: float, unicode: bool) -> str:
    groups = [[f"Reporting-MTA: dns; {me}", f"X-Qrouter-Queue-ID: {queue_id}"]]
    if envid:
        groups[0].append(f"Original-Envelope-Id: {envid}")
    groups[0].append(f"Arrival-Date: {email.utils.formatdate(arrival, localtime=True)}")
    for notice in notices:
        rcpt = notice.recipient
        kind = "utf-8" if unicode and not rcpt.address.isascii() else "rfc822"
        group = [f"Final-Recipient: {kind}; {rcpt.address}"]
        if rcpt.orcpt:
            group.append(f"Original-Recipient: {_orcpt(rcpt.orcpt)}")
        group += [f"Action: {notice.action}", f"Status: {rcpt.dsn or _default_status(notice.action)}"]
        said = _SAID.match(rcpt.reply)
        if said:
            group += [f"Remote-MTA: dns; {said['host']}", f"Diagnostic-Code: smtp; {said['reply']}"]
        elif rcpt.reply and notice.action in (FAILED, DELAYED):
            group.append(f"Diagnostic-Code: x-unix; {rcpt.reply}")
        group.append(f"Last-Attempt-Date: {email.utils.formatdate(now, localtime=True)}")
        if notice.action == DELAYED and retry_until:
            group.append(f"Will-Retry-Until: {email.utils.formatdate(retry_until, localtime=True)}")
        groups.append(group)
    return "\n\n".join("\n".join(group) for group in groups) + "\n"


def _orcpt(orcpt: str) -> str:
    """ORCPT as given (`rfc822;user@example.org`), in the report's `type; address` form."""
    kind, _, address = orcpt.partition(";")
    return f"{kind.strip()}; {address.strip()}" if address else f"rfc822; {orcpt.strip()}"


def _default_status(action: str) -> str:
    return {FAILED: "5.0.0", DELAYED: "4.0.0"}.get(action, "2.0.0")
