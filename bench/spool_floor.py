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
import socket
from collections.abc import Sequence

from smtp_sink import run_forked, wire_message


def _replies(sock: socket.socket, count: int) -> bytes:
    buffer = b""
    while buffer.count(b"\r\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the sink closed the connection")
        buffer += chunk
    if any(not line.startswith((b"2", b"354")) for line in buffer.split(b"\r\n")[:-1]):
        raise ConnectionError(f"the sink said {buffer!r}")
    return buffer


def _relay(spool: str, queue_ids: Sequence[str], port: int, log_path: str) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _replies(sock, 1)
    sock.sendall(b"EHLO floor.bench\r\n")
    while b"250 " not in sock.recv(65536):
        pass
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
        _replies(sock, 3)
        sock.sendall(wire)
        reply = _replies(sock, 1)
        os.unlink(active)
        os.write(log, b"%s: to=%s, status=sent (%s)\n" % (queue_id.encode(), fields[b"rcpt"], reply.rstrip()))
    sock.sendall(b"QUIT\r\n")
    sock.close()


def relay_spool(spool: str, queue_ids: Sequence[str], port: int, processes: int, log_path: str) -> float:
    """Relay the queued `queue_ids` from `spool` to the sink on `port` with `processes` forked
    loops, message i by loop i % processes; returns the perf_counter() reading before the first
    fork."""
    return run_forked([lambda part=queue_ids[i::processes]: _relay(spool, part, port, log_path)
                       for i in range(processes)], "spool floor loops")
