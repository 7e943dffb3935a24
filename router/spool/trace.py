"""The Received: field every hand-off puts first in a message, and so the hop count that ends loops.

Each place where a message enters a queue or leaves qrouter for another one adds one: the
front doors (`qrouter enqueue`, qrouter-sendmail, the aiosmtpd handler) and the transports that
hand a message on without SMTP (queue/router into another spool, queue/qpsmtpd into a qpsmtpd
plugin). A message going round between two spools or two hosts thus gains a field at every
turn, and delivery fails it with 5.4.6 once it has more than hopcount-limit (as Postfix's and
Exim's do), where without them it would go round for ever. An SMTP server qrouter hands mail to
adds its own, as every MTA does.

The field has the shape of RFC 5321 section 4.4, folded before `by` and `id`:

    Received: from client.example ([192.0.2.1])
            by mx.example (qrouter) with ESMTP
            id 6618577E5E7CC-7E37-1 for <user@example.org>; Mon, 1 Jan 2024 00:00:00 +0000

`from` is there when a peer is known (an SMTP client); a local submission says instead who
submitted it, as Postfix's pickup does: `by mx.example (qrouter, from userid 1000)`. `for` names
the recipient when there is only one, as Postfix's smtpd does: a list of them would show every
recipient (Bcc: ones too) to each of them. The date is the arrival the queue id holds, or the
time of a hand-off that keeps the message's queue id (queue/qpsmtpd).

A node that drains its queue to a peer (router/spool/drain.py) puts one more trace field first
in each message it relays there, so that the peer's max-age counts from the first arrival, not
from the hand-over:

    X-Qrouter-Arrival: 1765123456.123456; id=6618577E5E7CC-7E37-1

the arrival in seconds since the epoch and the queue id it had on the draining node. A qrouter
front door takes every such field out of the header, and believes the first one only when the
client is one of its `cluster-peers`: from anyone else it would let a sender expire mail at will.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence

from router.spool.headers import LINE, header_fields, header_of
from router.spool.queue_id import arrival_of

ARRIVAL_FIELD = "X-Qrouter-Arrival"
_ARRIVAL = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,9})?)(?:;.*)?", re.DOTALL)
_NOT_TOKEN = re.compile(r"[^!-~]|[()\\]")  # what may not stand in a trace token a peer chose (its HELO)


def received(hostname: str, queue_id: str, recipients: Sequence[str] = (), *, source: str = "",
             protocol: str = "", note: str = "", when: float | None = None) -> str:
    """The field ("Received: ...", folded with "\\n\\t") for a message queued as `queue_id` by
    `hostname`. `source` is the from-part (peer_source()), `protocol` the with-part (ESMTP,
    queue/router...), `note` more for the comment after qrouter ("from userid 0"); `when` the
    time of the hand-off when it is not the queue id's arrival."""
    by = f"by {hostname} (qrouter{', ' + note if note else ''})" + (f" with {protocol}" if protocol else "")
    last = f"id {queue_id}" + (f" for <{recipients[0]}>" if len(recipients) == 1 else "")
    date = email.utils.formatdate(arrival_of(queue_id) if when is None else when, localtime=True)
    return "Received: " + "\n\t".join([*([f"from {source}"] if source else []), by, f"{last}; {date}"])


def peer_source(helo: str | None, address: str) -> str:
    """The from-part for an SMTP client: the name it gave in HELO/EHLO (made safe: it is the
    client's to choose) and its IP address as an address literal ("" for none: a unix socket)."""
    literal = "" if not address else f"[IPv6:{address}]" if ":" in address else f"[{address}]"
    name = _NOT_TOKEN.sub("?", helo or "")[:255]
    return f"{name} ({literal})" if name and literal else name or literal or "unknown"


def arrival_field(arrival: float, queue_id: str) -> str:
    """The field a draining node puts first in a message it relays to its peer."""
    return f"{ARRIVAL_FIELD}: {arrival:.6f}; id={queue_id}"


def take_arrival(message: bytes) -> tuple[float | None, bytes]:
    """The arrival the first X-Qrouter-Arrival field of the header gives (None without one, or
    when it does not read as one), and the message with every such field taken out, all else
    byte for byte."""
    header = header_of(message)
    lines = LINE.findall(header)
    fields = [f for f in header_fields(lines) if f.name == ARRIVAL_FIELD.lower()]
    if not fields:
        return None, message
    found = _ARRIVAL.fullmatch(fields[0].value)
    dropped = {i for f in fields for i in range(f.first, f.end)}
    rest = b"".join(line for i, line in enumerate(lines) if i not in dropped) + message[len(header):]
    return (float(found[1]) if found else None), rest
