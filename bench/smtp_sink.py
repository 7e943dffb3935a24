"""A lean SMTP sink and a plain pipelining client, for the SMTP benchmarks in bench/run.py.

The sink must never be what limits a benchmark, and aiosmtpd (one asyncio process, a coroutine
per command) is far too slow for that. This one is a listening socket on loopback shared by a few
forked processes, each a small selectors loop that speaks just enough SMTP for a client that
pipelines: 220, EHLO (PIPELINING, 8BITMIME, SIZE), MAIL, RCPT, DATA, RSET, NOOP, QUIT, and BDAT,
whose CHUNKING the EHLO reply offers only with Session.chunking (bench/run.py --sink-chunking). It answers
every complete command in a read with one write, throws the message away (no disk), and counts
messages in shared memory with the time of the last one, so the benchmark reads both without
asking the sink anything. With `notify` it also writes each acceptance time to a pipe, for a
latency benchmark that waits for one message at a time.

`blast` is the ceiling the router is measured against: the same messages sent by the simplest
client that pipelines (EHLO once; per message MAIL, RCPT and DATA in one write, the message and
its dot in one write, then the next MAIL), one connection per process.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import selectors
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence

GREETING = b"220 sink.bench ESMTP\r\n"
EHLO = b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n"
EHLO_CHUNKING = b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 SIZE 52428800\r\n"
REPLIES = {
    b"HELO": b"250 sink.bench\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
}
DATA_GO = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 Ok: queued\r\n"
CHUNK_TAKEN = b"250 2.0.0 Ok: chunk taken\r\n"
BYE = b"221 2.0.0 Bye\r\n"
UNKNOWN = b"502 5.5.2 Error: command not recognized\r\n"
END = b"\r\n.\r\n"
SLOT = struct.Struct("qdq")  # per process: messages accepted, perf_counter() of the last, connections
STAMP = struct.Struct("d")
PR_SET_PDEATHSIG = 1


class Session:
    """The SMTP state of one client connection: its unparsed input, whether it is inside DATA or
    a BDAT chunk, and the latest RCPT. Both sinks (this one and bench/wan_sink.py) speak through
    it, so they answer exactly alike and differ only in when their replies go out."""

    chunking = False  # offer CHUNKING (RFC 3030); set before the sinks start: their processes inherit it

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.in_data = False
        self.scan = 0  # where to look for the end of data next
        self.recipient = b""  # the argument of the latest RCPT
        self.in_chunk = False
        self.chunk_left = 0  # octets of the BDAT chunk still to come
        self.last = False  # that chunk is the LAST one

    def feed(self, chunk: bytes) -> tuple[list[bytes], list[bytes], bool]:
        """Take what one read returned: the replies to everything now complete, in order (one
        QUEUED among them per message accepted), the RCPT argument of each message accepted, and
        False once the client has said QUIT."""
        buffer = self.buffer
        buffer += chunk
        out: list[bytes] = []
        accepted: list[bytes] = []
        position = 0
        while True:
            if self.in_chunk:
                if len(buffer) - position < self.chunk_left:
                    self.chunk_left -= len(buffer) - position
                    buffer.clear()
                    return out, accepted, True
                position += self.chunk_left
                self.in_chunk = False
                if self.last:
                    accepted.append(self.recipient)
                out.append(QUEUED if self.last else CHUNK_TAKEN)
                continue
            if self.in_data:
                end = buffer.find(END, self.scan)
                if end < 0:  # keep only what may be the start of the end marker
                    del buffer[:max(self.scan, len(buffer) - len(END) + 1)]
                    self.scan = 0
                    return out, accepted, True
                position = end + len(END)
                self.in_data = False
                accepted.append(self.recipient)
                out.append(QUEUED)
                continue
            end = buffer.find(b"\r\n", position)
            if end < 0:
                del buffer[:position]
                return out, accepted, True
            verb = bytes(buffer[position:position + 4]).upper()
            if verb == b"RCPT":
                self.recipient = bytes(buffer[position + 8:end])
            words = bytes(buffer[position + 5:end]).upper().split() if verb == b"BDAT" else []
            position = end + 2
            if verb == b"DATA":
                self.in_data = True
                self.scan = position - 2  # the CRLF of the DATA line may begin the end marker
                out.append(DATA_GO)
            elif verb == b"BDAT" and words and words[0].isdigit():
                self.in_chunk, self.chunk_left, self.last = True, int(words[0]), words[1:] == [b"LAST"]
            elif verb == b"EHLO":
                out.append(EHLO_CHUNKING if self.chunking else EHLO)
            elif verb == b"QUIT":
                out.append(BYE)
                return out, accepted, False
            else:
                out.append(REPLIES.get(verb, UNKNOWN))


def fork_server(serve: Callable[[], None]) -> int:
    """Run `serve` in a forked child that dies with the benchmark (even a kill -9 of it) and on
    SIGTERM; returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the benchmark
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            serve()
        except BaseException:
            status = 70
        finally:
            os._exit(status)
    return pid


def stop_servers(pids: list[int]) -> None:
    """SIGTERM the servers fork_server started and reap them; forgets them, so a second call
    does nothing."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in pids:
        os.waitpid(pid, 0)
    pids.clear()


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time (user + system) the processes have used so far."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


class Sink:
    """`processes` forked servers on one loopback socket; use as a context manager."""

    def __init__(self, processes: int = 2, notify: bool = False):
        self.processes = processes
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.shared = mmap.mmap(-1, SLOT.size * processes)
        self.notify_read, self.notify_write = os.pipe() if notify else (-1, -1)
        self.pids: list[int] = []

    def __enter__(self) -> Sink:
        for index in range(self.processes):
            self.pids.append(fork_server(lambda index=index: self._serve(index)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        stop_servers(self.pids)
        self.listener.close()
        for fd in (self.notify_read, self.notify_write):
            if fd >= 0:
                os.close(fd)

    # -- what the benchmark reads ---------------------------------------------------------------

    def accepted(self) -> int:
        """Messages accepted so far, by all processes."""
        return sum(SLOT.unpack_from(self.shared, i * SLOT.size)[0] for i in range(self.processes))

    def last_accepted(self) -> float:
        """perf_counter() when the latest message was accepted (0.0 before any)."""
        return max(SLOT.unpack_from(self.shared, i * SLOT.size)[1] for i in range(self.processes))

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server processes have used so far."""
        return cpu_seconds(self.pids)

    def wait_accepted(self, timeout: float) -> float | None:
        """One notification (sink made with notify=True): the acceptance time of the next
        message, or None after `timeout` seconds."""
        readable, _, _ = select.select([self.notify_read], [], [], timeout)
        if not readable:
            return None
        return STAMP.unpack(os.read(self.notify_read, STAMP.size))[0]

    # -- one server process ----------------------------------------------------------------------

    def _serve(self, index: int) -> None:
        if self.notify_read >= 0:
            os.close(self.notify_read)
        offset = index * SLOT.size
        selector = selectors.DefaultSelector()
        self.listener.setblocking(False)
        selector.register(self.listener, selectors.EVENT_READ, None)
        stats = [0, 0.0, 0]
        while True:
            for key, _ in selector.select():
                if key.data is None:
                    if self._fewest_connections(index, stats[2]):
                        self._accept(selector, stats, offset)
                    continue
                sock, session = key.data
                if not self._on_readable(sock, session, stats, offset):
                    selector.unregister(sock)
                    sock.close()
                    stats[2] -= 1
                    SLOT.pack_into(self.shared, offset, *stats)

    def _fewest_connections(self, index: int, mine: int) -> bool:
        """Spread connections evenly over the processes: only one with the fewest accepts (the
        others see the listener readable again until it has)."""
        others = (SLOT.unpack_from(self.shared, i * SLOT.size)[2] for i in range(self.processes) if i != index)
        if mine <= min(others, default=mine):
            return True
        time.sleep(0.0005)
        return False

    def _accept(self, selector: selectors.BaseSelector, stats: list, offset: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)  # one write per read: the client reads its replies before it writes more
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(GREETING)
        selector.register(sock, selectors.EVENT_READ, (sock, Session()))
        stats[2] += 1
        SLOT.pack_into(self.shared, offset, *stats)

    def _on_readable(self, sock: socket.socket, session: Session, stats: list, offset: int) -> bool:
        """Answer everything complete in the input at once, in one write; False when the session
        is over."""
        try:
            chunk = sock.recv(256 * 1024)
        except ConnectionError:
            return False
        if not chunk:
            return False
        out, accepted, open_ = session.feed(chunk)
        if accepted:
            stats[0] += len(accepted)
            stats[1] = time.perf_counter()
            SLOT.pack_into(self.shared, offset, *stats)
            if self.notify_write >= 0:
                os.write(self.notify_write, STAMP.pack(stats[1]) * len(accepted))
        if out:
            try:
                sock.sendall(b"".join(out))
            except ConnectionError:
                return False
        return open_


# -- the ceiling: a plain pipelining client ------------------------------------------------------


def wire_message(message: bytes) -> bytes:
    """What follows a 354: CRLF line ends, dot-stuffed, and the final dot."""
    data = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    return (b"." + data if data.startswith(b".") else data) + b".\r\n"


def read_replies(sock: socket.socket, buffer: bytearray, count: int) -> bytes:
    """Wait for `count` single-line replies and return the last; any that is not 2xx or 354 is
    an error."""
    while buffer.count(b"\r\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the sink closed the connection")
        buffer += chunk
    reply = b""
    for _ in range(count):
        end = buffer.index(b"\r\n")
        reply = bytes(buffer[:end])
        if not reply.startswith((b"2", b"354")):
            raise ConnectionError(f"the sink said {reply!r}")
        del buffer[:end + 2]
    return reply


def open_session(port: int, name: bytes) -> tuple[socket.socket, bytearray]:
    """Connect to the sink and say EHLO; the socket and an empty reply buffer."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    read_replies(sock, buffer, 1)
    sock.sendall(b"EHLO " + name + b"\r\n")
    while b"250 " not in buffer:
        buffer += sock.recv(65536)
    buffer.clear()
    return sock, buffer


def _client(port: int, sender: str, envelopes: Sequence[tuple[str, bytes]]) -> None:
    sock, buffer = open_session(port, b"client.bench")
    for recipient, wire in envelopes:
        sock.sendall(f"MAIL FROM:<{sender}> SIZE={len(wire)}\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
        read_replies(sock, buffer, 3)
        sock.sendall(wire)
        read_replies(sock, buffer, 1)
    sock.sendall(b"QUIT\r\n")
    read_replies(sock, buffer, 1)
    sock.close()


def blast(port: int, sender: str, envelopes: Sequence[tuple[str, bytes]], connections: int) -> float:
    """Send (recipient, wire message) pairs over `connections` forked clients, message i on
    connection i % connections; returns the perf_counter() reading before the first fork."""
    return run_forked([lambda part=envelopes[i::connections]: _client(port, sender, part) for i in range(connections)],
                      "ceiling clients")


def run_forked(jobs: Sequence[Callable[[], None]], what: str) -> float:
    """Run each job in a forked process of its own and wait for all; returns the perf_counter()
    reading before the first fork, and raises if any of them failed."""
    started = time.perf_counter()
    pids = []
    for job in jobs:
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                job()
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} {what} failed")
    return started
