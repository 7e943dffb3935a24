"""The fields a final delivery adds to the top of a message, and the loops they reveal.

`Return-Path: <sender>` keeps the envelope sender, which a mailbox otherwise loses, and
`Delivered-To: recipient` names each final recipient, as Postfix's local(8), virtual(8) and
pipe(8) write them. A message that arrives carrying a Delivered-To: for the very recipient it
is being delivered to has been here before: delivering it again would go round for ever, so it
fails with 5.4.6 instead (RFC 3463: routing loop detected). So does a message that has passed
more hops than hopcount-limit: every MTA adds a Received: (qrouter at each hand-off, router/spool/trace.py),
every final delivery a Delivered-To:.
"""

from __future__ import annotations

from collections.abc import Iterable

from router.spool.headers import message_fields, prepend_fields

LOOP_DSN = "5.4.6"


def looping(message: bytes, recipients: Iterable[str]) -> list[str]:
    """The recipients the message already names in a Delivered-To: field (case-insensitively)."""
    seen = {f.value.strip().lower() for f in message_fields(message) if f.name == "delivered-to"}
    return [address for address in recipients if address.lower() in seen]


def hop_count(message: bytes) -> int:
    """The hops a message has passed: its Received: and Delivered-To: fields."""
    return sum(1 for f in message_fields(message) if f.name in ("received", "delivered-to"))


def loop_reply(address: str) -> str:
    return f"mail forwarding loop for {address}: the message already has Delivered-To: {address}"


def with_delivery_fields(message: bytes, sender: str, recipients: Iterable[str]) -> bytes:
    """The message with Return-Path: and one Delivered-To: per recipient in front of it."""
    return prepend_fields(message, [f"Return-Path: <{sender}>", *(f"Delivered-To: {r}" for r in recipients)])
