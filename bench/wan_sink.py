"""An SMTP sink that answers like a next hop across the internet, and a client to check it, for
the smtp-wan and slow-destination benchmarks in bench/run.py.

Real next hops are 20-200 ms away and often take 0.2-2 s to answer the final dot. This sink
listens on several loopback ports (one per destination), each with its own delays: every reply
goes out `reply` seconds (D) after the read that caused it, so a pipelined MAIL, RCPT, DATA batch
costs one D as a round trip would, and the greeting waits D too; the reply to the final dot waits
`dot` seconds (S) more. It speaks through smtp_sink.Session, so it answers exactly what the lean
sink answers, and keeps nothing on disk; it offers CHUNKING as Session.chunking says, or as the
sink is told.

Waiting must cost the sink nothing while hundreds of connections wait at once, so each server
process is one asyncio loop and a delay is a timer, not a sleeping thread. The ports are shared
out over one or a few forked processes (port i to process i % processes). In shared memory the
benchmark reads, without asking the sink anything: per port the connections open now, the most
seen at once, the messages accepted and the round trips; per process every acceptance (perf_counter(), the
monotonic clock, when the 250 went out; the port; and the number in the recipient's local part,
so that a benchmark sending message N to mN@... knows when each message was accepted).

`push` is the check that the sink is not what limits a benchmark: a plain pipelining client
(asyncio, one process, many connections) that sends messages from memory through the same
delays.

A round trip is a turn of the client's that the sink answered: its greeting (the client waits for
it after connecting), and each read that produced replies (a pipelined batch is one read). The
reply to a final dot held back by S goes out in a write of its own but is still the answer to the
same turn. Divided by the messages accepted it is the round trips per message, connection set-up
and QUIT included.
"""

from __future__ import annotations

import asyncio
import mmap
import re
import resource
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from smtp_sink import GREETING, QUEUED, Session, cpu_seconds, fork_server, run_forked, stop_servers

PORT_SLOT = struct.Struct("qqqq")  # per port: connections now, most at once, messages accepted, round trips
COUNT = struct.Struct("q")  # per process: acceptances recorded so far
RECORD = struct.Struct("dii")  # one acceptance: perf_counter() of its 250, port index, tag
CAPACITY = 1 << 16  # acceptances recorded per process; later ones are only counted
_TAG = re.compile(rb"<[^@>0-9]*([0-9]{1,9})@")


@dataclass(frozen=True)
class Delay:
    """How one destination answers: every reply `reply` seconds after the read that caused it
    (D), the reply to the final dot `dot` seconds later still (S)."""

    reply: float
    dot: float = 0.0

    def __str__(self) -> str:
        return f"D={self.reply * 1000:g} S={self.dot * 1000:g}"


@dataclass(frozen=True)
class Acceptance:
    at: float  # perf_counter() when the sink sent its 250 to the final dot
    port: int  # index of the port (destination) in WanSink.ports
    tag: int  # the number in the recipient's local part, -1 if none


class WanSink:
    """One loopback listening socket per entry of `delays`, served by `processes` forked asyncio
    loops; use as a context manager (close() stops it earlier). `chunking`: whether its EHLO offers
    CHUNKING (None: as Session.chunking says)."""

    def __init__(self, delays: Sequence[Delay], processes: int = 1, chunking: bool | None = None):
        self.delays = list(delays)
        self.chunking = chunking
        self.processes = min(processes, len(self.delays))
        self.listeners = [socket.create_server(("127.0.0.1", 0), backlog=1024) for _ in self.delays]
        self.ports = [listener.getsockname()[1] for listener in self.listeners]
        self._records_at = PORT_SLOT.size * len(self.delays)
        self._region = COUNT.size + RECORD.size * CAPACITY
        self.shared = mmap.mmap(-1, self._records_at + self._region * self.processes)
        self.pids: list[int] = []

    def __enter__(self) -> WanSink:
        for index in range(self.processes):
            self.pids.append(fork_server(lambda index=index: asyncio.run(self._serve(index))))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the servers: every connection to them ends at once."""
        stop_servers(self.pids)
        for listener in self.listeners:
            listener.close()

    # -- what the benchmark reads ---------------------------------------------------------------

    def _port_slot(self, port: int) -> tuple[int, int, int, int]:
        return PORT_SLOT.unpack_from(self.shared, port * PORT_SLOT.size)

    def accepted(self, port: int | None = None) -> int:
        """Messages accepted so far, on one port (by index) or on all."""
        ports = range(len(self.ports)) if port is None else [port]
        return sum(self._port_slot(p)[2] for p in ports)

    def round_trips(self, port: int | None = None) -> int:
        """Round trips so far (turns of the clients that the sink answered), on one port or on all."""
        ports = range(len(self.ports)) if port is None else [port]
        return sum(self._port_slot(p)[3] for p in ports)

    def peak_connections(self) -> list[int]:
        """Per port, the most connections that were open at once."""
        return [self._port_slot(p)[1] for p in range(len(self.ports))]

    def records(self) -> list[Acceptance]:
        """Every acceptance recorded so far, in the order of their 250s."""
        found = []
        for process in range(self.processes):
            offset = self._records_at + process * self._region
            count = min(COUNT.unpack_from(self.shared, offset)[0], CAPACITY)
            found += [Acceptance(*RECORD.unpack_from(self.shared, offset + COUNT.size + i * RECORD.size))
                      for i in range(count)]
        return sorted(found, key=lambda record: record.at)

    def last_accepted(self) -> float:
        """perf_counter() of the latest 250 to a final dot (0.0 before any)."""
        return max((record.at for record in self.records()), default=0.0)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server processes have used so far."""
        return cpu_seconds(self.pids)

    # -- one server process ----------------------------------------------------------------------

    async def _serve(self, index: int) -> None:
        most_files()
        if self.chunking is not None:  # this process's own: the sink's parent is left as it was
            Session.chunking = self.chunking
        loop = asyncio.get_running_loop()
        count_at = self._records_at + index * self._region
        recorded = [0]

        def connected(port: int, change: int) -> None:
            now, peak, accepted, turns = self._port_slot(port)
            PORT_SLOT.pack_into(self.shared, port * PORT_SLOT.size, now + change, max(peak, now + change), accepted,
                                turns)

        def answered(port: int) -> None:
            now, peak, accepted, turns = self._port_slot(port)
            PORT_SLOT.pack_into(self.shared, port * PORT_SLOT.size, now, peak, accepted, turns + 1)

        def accepted(port: int, recipients: list[bytes]) -> None:
            at = time.perf_counter()
            now, peak, count, turns = self._port_slot(port)
            PORT_SLOT.pack_into(self.shared, port * PORT_SLOT.size, now, peak, count + len(recipients), turns)
            for recipient in recipients:
                if recorded[0] < CAPACITY:
                    match = _TAG.search(recipient)
                    RECORD.pack_into(self.shared, count_at + COUNT.size + recorded[0] * RECORD.size,
                                     at, port, int(match[1]) if match else -1)
                    recorded[0] += 1
            COUNT.pack_into(self.shared, count_at, recorded[0])  # after the records it counts

        for port in range(index, len(self.ports), self.processes):
            await loop.create_server(lambda port=port: _Delayed(self.delays[port], port, connected, answered, accepted),
                                     sock=self.listeners[port])
        await asyncio.Event().wait()  # until SIGTERM


class _Delayed(asyncio.Protocol):
    """One client connection. Replies wait in a queue, each with the time it is due; due times
    never decrease, so replies go out in order, and everything one read caused goes out in one
    write (two when it holds a final dot and S is not 0)."""

    def __init__(self, delay: Delay, port: int, connected: Callable[[int, int], None],
                 answered: Callable[[int], None], accepted: Callable[[int, list[bytes]], None]):
        self.delay = delay
        self.port = port
        self.connected = connected
        self.answered = answered
        self.accepted = accepted
        self.session = Session()
        self.pending: deque[tuple[bytes, list[bytes]]] = deque()
        self.last_due = 0.0
        self.quitting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.connected(self.port, 1)
        self.answered(self.port)
        self._later(self.delay.reply, [GREETING], [])

    def connection_lost(self, exc: Exception | None) -> None:
        self.connected(self.port, -1)

    def data_received(self, data: bytes) -> None:
        replies, recipients, open_ = self.session.feed(data)
        self.quitting = self.quitting or not open_
        if replies:
            self.answered(self.port)
        if recipients and self.delay.dot:
            dot = replies.index(QUEUED)
            if dot:
                self._later(self.delay.reply, replies[:dot], [])
            self._later(self.delay.reply + self.delay.dot, replies[dot:], recipients)
        elif replies:
            self._later(self.delay.reply, replies, recipients)

    def _later(self, delay: float, replies: list[bytes], recipients: list[bytes]) -> None:
        self.last_due = max(self.loop.time() + delay, self.last_due)
        self.pending.append((b"".join(replies), recipients))
        self.loop.call_at(self.last_due, self._send_next)

    def _send_next(self) -> None:
        """One timer per queued write: timers fire in the order of their due times, so the k-th to
        fire sends the k-th write."""
        data, recipients = self.pending.popleft()
        if self.transport.is_closing():
            return
        self.transport.write(data)
        if recipients:
            self.accepted(self.port, recipients)
        if self.quitting and not self.pending:
            self.transport.close()


def most_files() -> None:
    """Raise this process's open-file limit to the most allowed: the check opens a thousand
    connections and more, past the usual soft limit of 1,024."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the check: a plain pipelining client -------------------------------------------------------


async def _replies(reader: asyncio.StreamReader, count: int) -> None:
    """Wait for `count` replies (multi-line ones whole); any that is not 2xx or 354 is an error."""
    while count:
        line = await reader.readuntil(b"\r\n")
        if not line.startswith((b"2", b"354")):
            raise ConnectionError(f"the sink said {line!r}")
        count -= line[3:4] != b"-"


async def _session(port: int, sender: str, envelopes: Sequence[tuple[str, bytes]]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _replies(reader, 1)
    writer.write(b"EHLO client.bench\r\n")
    await _replies(reader, 1)
    for recipient, wire in envelopes:
        writer.write(f"MAIL FROM:<{sender}> SIZE={len(wire)}\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
        await _replies(reader, 3)
        writer.write(wire)
        await _replies(reader, 1)
    writer.write(b"QUIT\r\n")
    await _replies(reader, 1)
    writer.close()


async def _sessions(jobs: list[tuple[int, Sequence[tuple[str, bytes]]]], sender: str) -> None:
    most_files()
    await asyncio.gather(*(_session(port, sender, envelopes) for port, envelopes in jobs))


def push(sink: WanSink, sender: str, envelopes: Sequence[tuple[int, str, bytes]], per_port: int) -> float:
    """Send (port index, recipient, wire message) triples from one forked asyncio process,
    `per_port` connections to each port, each connection one message at a time (MAIL, RCPT and
    DATA in one write, then the message). Returns the perf_counter() reading before the fork;
    raises if any connection failed."""
    by_port: dict[int, list[tuple[str, bytes]]] = {}
    for port, recipient, wire in envelopes:
        by_port.setdefault(port, []).append((recipient, wire))
    jobs = [(sink.ports[port], part[i::per_port]) for port, part in by_port.items() for i in range(per_port)]
    return run_forked([lambda: asyncio.run(_sessions([job for job in jobs if job[1]], sender))], "wan client")
