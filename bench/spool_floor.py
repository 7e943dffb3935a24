"""The spool floor, for the smtp-drain benchmark: the least work per message of any relay that
keeps qrouter's spool rules, written as plainly as Python allows.

The ceiling client (smtp_sink.blast) sends messages it holds in memory, so it shows what the sink
can take, not what a relay that owns its messages on disk can reach. This loop adds only what
such a relay cannot skip, per message: claim the queue file by rename into active/, read it, send
it in one transaction (MAIL, RCPT and DATA in one write, the message in the next, as the ceiling
client does), unlink the file, and write one log line. It routes nothing, checks nothing,
journals nothing and keeps no state, so the router can never be faster; the gap between the two
is the router's own cost, and the gap between this and the ceiling is the cost of the spool.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from smtp_sink import open_session, read_replies, run_forked, wire_message


def _relay(spool: str, queue_ids: Sequence[str], port: int, log_path: str) -> None:
    sock, buffer = open_session(port, b"floor.bench")
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for queue_id in queue_ids:
        active = f"{spool}/active/{queue_id}"
        os.rename(f"{spool}/incoming/{queue_id}", active)
        fd = os.open(active, os.O_RDONLY)
        data = os.read(fd, 1 << 20)
        os.close(fd)
        header, _, rest = data.partition(b"\n\n")
        fields = dict(line.split(b" ", 1) for line in header.split(b"\n")[1:])
        wire = wire_message(rest[:int(fields[b"size"])])
        envelope = (fields[b"sender"], len(wire), fields[b"rcpt"])
        sock.sendall(b"MAIL FROM:%s SIZE=%d\r\nRCPT TO:%s\r\nDATA\r\n" % envelope)
        read_replies(sock, buffer, 3)
        sock.sendall(wire)
        reply = read_replies(sock, buffer, 1)
        os.unlink(active)
        os.write(log, b"%s: to=%s, status=sent (%s)\n" % (queue_id.encode(), fields[b"rcpt"], reply))
    sock.sendall(b"QUIT\r\n")
    sock.close()


def relay_spool(spool: str, queue_ids: Sequence[str], port: int, processes: int, log_path: str) -> float:
    """Relay the queued `queue_ids` from `spool` to the sink on `port` with `processes` forked
    loops, message i by loop i % processes; returns the perf_counter() reading before the first
    fork."""
    return run_forked([lambda part=queue_ids[i::processes]: _relay(spool, part, port, log_path)
                       for i in range(processes)], "spool floor loops")
