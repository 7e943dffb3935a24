"""queue/router DIR: hand the message on to another qrouter spool, a chain of queues.

The message is queued into DIR's incoming/ as a new message of that spool, with the same envelope
sender, message bytes and DSN fields (each recipient's NOTIFY and ORCPT, the ENVID and RET), for
the recipients routed there, all at once. It is written by that spool's own writer (Spool.write:
staged in tmp/, fsynced, renamed into incoming/, the directory fsynced), so it counts as delivered
here only once it is as safe there as any queued message: then the daemon serving DIR delivers it,
or it waits there for one. Spool.enqueue is not used because it gives every recipient one NOTIFY
and none an ORCPT.

A Received: field naming the hand-off goes first (router/spool/trace.py): it counts as a hop, so two
spools routing a domain to each other end the loop at hopcount-limit with a report (5.4.6)
rather than passing the mail back and forth for ever.
"""

from __future__ import annotations

import errno
import grp
import os
import stat
from typing import TYPE_CHECKING

from policy.next_hop import NextHop
from router.spool import INCOMING, Spool
from router.spool.durable import error_name
from router.spool.headers import prepend_fields
from router.spool.queue_file import QueueFile, Recipient
from router.spool.queue_id import arrival_of, new_queue_id
from router.spool.trace import received
from workers.transport import DEFERRED, SENT, NoOpClose, Outcome

if TYPE_CHECKING:
    from router.config import Config

_FULL = (errno.ENOSPC, errno.EDQUOT)  # 4.3.1, mail system full


class RouterTransport(NoOpClose):
    """Registered as `router` in the entry point group qrouter.transports (pyproject.toml)."""

    def __init__(self, config: Config) -> None:
        self.own_spool = os.path.realpath(config.queue_dir)
        self.hostname = config.hostname

    @staticmethod
    def check(argument: str) -> None:
        """Only that a directory is named: whether it is a spool may change, and is for delivery
        to find out (a deferral until it is)."""
        if not argument:
            raise ValueError("needs the spool directory of the next qrouter, e.g. "
                             "'queue/router /var/spool/qrouter-outbound'")

    def deliver(self, message: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        directory = hop.argument
        relay = f"router[{directory}]"
        if os.path.realpath(directory) == self.own_spool:  # it would come back here at once, for ever
            return Outcome.same_for(recipients, DEFERRED, "4.3.5",
                                    f"{directory} is this daemon's own spool: the mail would loop", relay)
        queue_id = new_queue_id()
        handed_on = message.copy_for(queue_id, arrival_of(queue_id), recipients)
        handed_on.message = prepend_fields(message.message, [received(
            self.hostname, queue_id, [rcpt.address for rcpt in recipients], protocol="queue/router",
            note=f"from queue id {message.queue_id}")])
        spool = Spool(directory, _shared_group(directory))
        try:
            spool.write(handed_on, INCOMING)
        except OSError as exc:
            return Outcome.same_for(recipients, DEFERRED, "4.3.1" if exc.errno in _FULL else "4.3.0",
                                    f"cannot queue into {directory}: {exc.strerror or exc} ({error_name(exc)})",
                                    relay)
        finally:
            spool.close()
        return Outcome.same_for(recipients, SENT, "2.0.0", f"queued as {queue_id}", relay)


def _shared_group(directory: str) -> str:
    """The group of a spool shared with a group (`spool-group`: incoming/ is setgid), whose files
    must be the group's to read: the daemon serving it may run as another user of that group."""
    try:
        info = os.stat(os.path.join(directory, INCOMING))
    except OSError:
        return ""  # the write names the problem
    if not info.st_mode & stat.S_ISGID:
        return ""
    try:
        return grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        return str(info.st_gid)
