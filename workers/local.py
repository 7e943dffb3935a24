"""Pipes and local delivery agents: a program run as a unix user, the message on its stdin.

    /usr/bin/maildrop -f ${sender}            as the user the aliases file names for the local part
    |user=robot /usr/local/bin/robot ${recipient}     as user=, else pipe-user

One run per recipient (a pipe with per=message: one for all its recipients of the message),
with Return-Path: and Delivered-To: in front of the message, the placeholders of the command
line expanded into single arguments (policy/command_line.py), and an environment made from
scratch: the user's HOME, USER, LOGNAME, SHELL, a fixed PATH, and the envelope as SENDER,
RECIPIENT, ORIGINAL_RECIPIENT, DOMAIN, LOCAL, EXTENSION and QUEUE_ID. How the program ends
decides the outcome (workers/command.py). Only a local worker, which may switch users, has this
transport (workers/pools.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from policy.command_line import PER_MESSAGE, expand, split_local
from policy.next_hop import MDA, NextHop
from router.spool.address import split_address
from router.spool.queue_file import QueueFile, Recipient
from workers.command import Account, Command, run
from workers.delivery_fields import LOOP_DSN, loop_reply, looping, with_delivery_fields
from workers.transport import BOUNCED, DEFERRED, NoOpClose, Outcome

if TYPE_CHECKING:
    from router.config import Config


def relay_of(hop: NextHop) -> str:
    """The relay= of the log line: the kind of delivery, the user and the program."""
    return f"{'local' if hop.kind == MDA else 'pipe'}[{hop.user}:{hop.argv[0]}]"


def recipient_values(rcpt: Recipient) -> dict[str, str]:
    """The placeholders that differ per recipient (policy/command_line.py)."""
    local, domain = split_address(rcpt.address)
    user, extension = split_local(local)
    return {"recipient": rcpt.address, "original_recipient": rcpt.orcpt or rcpt.address, "mailbox": local,
            "user": user, "extension": extension, "domain": domain}


def message_values(message: QueueFile) -> dict[str, str]:
    return {"sender": message.sender, "queue_id": message.queue_id}


def program_environment(message: QueueFile, recipients: list[Recipient]) -> dict[str, str]:
    """The envelope as environment variables; those of a recipient only for a run for one."""
    env = {"SENDER": message.sender, "QUEUE_ID": message.queue_id}
    if len(recipients) == 1:
        values = recipient_values(recipients[0])
        env.update(RECIPIENT=values["recipient"], ORIGINAL_RECIPIENT=values["original_recipient"],
                   DOMAIN=values["domain"], LOCAL=values["mailbox"], EXTENSION=values["extension"])
    return env


def command_for(message: QueueFile, recipients: list[Recipient], hop: NextHop, account: Account,
                time_limit: float) -> Command:
    """What runs for these recipients: also what `qrouter route` shows, without running it."""
    argv = expand(hop.argv, message_values(message), [recipient_values(r) for r in recipients])
    return Command(tuple(argv), account, program_environment(message, recipients), time_limit)


class ProgramTransport(NoOpClose):
    """The transport of MDA and pipe next hops."""

    def __init__(self, config: Config) -> None:
        self.time_limit = config.command_time_limit

    def deliver(self, message: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        relay = relay_of(hop)
        looped = set(looping(message.message, (r.address for r in recipients)))
        outcomes: dict[int, Outcome] = {}
        runnable = []
        for index, rcpt in enumerate(recipients):
            if rcpt.address in looped:
                outcomes[index] = Outcome(BOUNCED, LOOP_DSN, loop_reply(rcpt.address), relay)
            else:
                runnable.append(index)
        runs = [runnable] if hop.per == PER_MESSAGE and runnable else [[index] for index in runnable]
        for group in runs:
            outcome = self._run(message, [recipients[index] for index in group], hop, relay)
            outcomes.update(dict.fromkeys(group, outcome))
        return [outcomes[index] for index in range(len(recipients))]

    def _run(self, message: QueueFile, recipients: list[Recipient], hop: NextHop, relay: str) -> Outcome:
        try:
            account = Account.named(hop.user)
        except LookupError as exc:  # the user was removed after the policy was loaded
            return Outcome(DEFERRED, "4.3.0", str(exc), relay)
        command = command_for(message, recipients, hop, account, self.time_limit)
        data = with_delivery_fields(message.message, message.sender, (r.address for r in recipients))
        result = run(command, data)
        return Outcome(result.status, result.dsn, result.reply, relay)
