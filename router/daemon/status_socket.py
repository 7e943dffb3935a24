"""The status socket: a Unix socket where the daemon answers one JSON request a connection.

`qrouter status` and the queue commands talk to the running daemon through it. Requests and
answers are one JSON object a line; the socket is mode 0660 so the spool group may ask too. The
kernel tells who each client is (SO_PEERCRED): the answer function gets the client's uid, and
the daemon lets only root and its own user change the queue (docs/control.md).

An answer that needs another process (a DNS lookup a worker makes, for `verify`) is a `Later`:
the client waits, without holding up the loop, until the daemon `settle`s it or its deadline
comes, when it gets what `finish(None)` says.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.spool.durable import unlink_quietly
from router.spool.lock import NO_SPACE

MAX_REQUEST = 8 << 20  # room for the ids of a few hundred thousand messages
MAX_CONNECTIONS = 64
LISTEN_BACKLOG = 128  # connections the kernel holds until the loop accepts them
CONNECTION_SECONDS = 5.0  # from connect to the end of the answer

log = logging.getLogger("qrouter")


class StatusError(RuntimeError):
    pass


@dataclass(frozen=True)
class Later:
    """An answer not known yet: `finish(result)` makes it once `StatusServer.settle(key, result)`
    brings the result, or `finish(None)` at the client's deadline."""

    key: str
    finish: Callable[[Any], dict[str, Any]]


class _Connection:
    """One client: the request read so far, then the answer still to send."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.uid = peer_uid(sock)
        self.request = bytearray()
        self.answer: memoryview | None = None  # set once the request is complete
        self.later: Later | None = None  # the answer it waits for, not known yet


class StatusServer:
    """The daemon's side of the status socket, served by the supervisor's own event loop.

    That loop also hands out mail, and anyone in the spool group can connect, so nothing here
    may wait for a client: sockets are non-blocking and driven by the loop's selector, and a
    client gets at most MAX_REQUEST bytes of request, one answer of output buffer, and
    `timeout` seconds from connect to the end of its answer (past that, `expire`, which the
    loop calls before every select, closes it). At most `max_connections` are open: a new one
    drops the oldest, which is nearest its deadline anyway, so that a fresh `qrouter status`
    gets through however many clients sit idle.

    When there is no room on the disk for the socket, the daemon runs without it (logged):
    only delivery frees space, so a full disk must not stop the daemon from starting.
    """

    def __init__(self, path: str, answer: Callable[[dict[str, Any], int], dict[str, Any] | Later],
                 selector: selectors.BaseSelector, *, timeout: float = CONNECTION_SECONDS,
                 max_connections: int = MAX_CONNECTIONS):
        self.path = path
        self.answer = answer
        self.selector = selector
        self.timeout = timeout
        self.max_connections = max_connections
        self.connections: dict[_Connection, None] = {}  # oldest first, hence in deadline order
        self.waiting: dict[str, list[_Connection]] = {}  # Later.key -> the clients waiting for it
        self.listener = self._listen()
        if self.listener is not None:
            selector.register(self.listener, selectors.EVENT_READ, functools.partial(self._on_accept, self.listener))

    def _listen(self) -> socket.socket | None:
        """Bind the socket, replacing one a dead daemon left (the spool lock says none runs)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
        except OSError as exc:
            listener.close()
            if exc.errno not in NO_SPACE:
                raise
            log.warning("cannot make status socket %s: %s; running without it (qrouter status cannot "
                        "reach the daemon)", self.path, exc.strerror)
            return None
        os.chmod(self.path, 0o660)
        listener.listen(max(LISTEN_BACKLOG, self.max_connections))
        listener.setblocking(False)
        return listener

    def fds(self) -> list[int]:
        """Every descriptor the server holds, for a forked worker to close."""
        sockets = [self.listener] if self.listener is not None else []
        return [sock.fileno() for sock in (*sockets, *(conn.sock for conn in self.connections))]

    def expire(self) -> float | None:
        """Close the connections past their deadline; return the seconds until the next one is
        due (None with no connection open), for the loop to wake up in time."""
        now = time.monotonic()
        while self.connections:
            oldest = next(iter(self.connections))
            if oldest.deadline > now:
                return oldest.deadline - now
            self._drop(oldest)
        return None

    def settle(self, key: str, result: Any) -> None:
        """The result the clients waiting on `key` need: each gets its answer now."""
        for conn in self.waiting.pop(key, []):
            if conn in self.connections and conn.later is not None and conn.answer is None:
                self._reply(conn, conn.later.finish(result))

    def awaited(self, key: str) -> bool:
        """Whether a client waits on `key` already (one question is asked once)."""
        return key in self.waiting

    def close(self) -> None:
        """Stop serving: drop every connection and remove the socket."""
        while self.connections:
            self._close(next(iter(self.connections)))
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
            unlink_quietly(self.path)

    def _on_accept(self, listener: socket.socket) -> None:
        """Take the waiting clients, at most max_connections in one go: the loop has mail to
        hand out too, and the selector calls again for the rest."""
        for _ in range(self.max_connections):
            try:
                sock, _ = listener.accept()
            except OSError:  # none waiting, or no descriptor left: at the next event
                return
            if len(self.connections) >= self.max_connections:
                self._drop(next(iter(self.connections)))
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic() + self.timeout)
            self.connections[conn] = None
            self.selector.register(sock, selectors.EVENT_READ, functools.partial(self._on_ready, conn))

    def _on_ready(self, conn: _Connection) -> None:
        if conn not in self.connections:  # dropped earlier in the same round of events
            return
        if conn.later is not None and conn.answer is None:
            self._wait(conn)
        elif conn.answer is None:
            self._receive(conn)
        else:
            self._send(conn, conn.answer)

    def _receive(self, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(MAX_REQUEST + 1 - len(conn.request))
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        conn.request += chunk
        if b"\n" in chunk or not chunk:  # a whole line, or all the client is going to send
            answer = self._respond(bytes(conn.request.partition(b"\n")[0]), conn.uid)
            if isinstance(answer, Later):
                conn.later = answer
                self.waiting.setdefault(answer.key, []).append(conn)
            else:
                self._reply(conn, answer)
        elif len(conn.request) > MAX_REQUEST:
            self._reply(conn, {"error": f"bad request: longer than {MAX_REQUEST} bytes"})

    def _wait(self, conn: _Connection) -> None:
        """A client waiting for a Later sent more, or hung up: more is ignored, a hang-up ends it."""
        try:
            if conn.sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(conn)

    def _unwait(self, conn: _Connection) -> None:
        """Take a client off the list of those waiting for its Later, if it is on it."""
        if conn.later is None:
            return
        waiting = self.waiting.get(conn.later.key, [])
        if conn in waiting:
            waiting.remove(conn)
        if not waiting:
            self.waiting.pop(conn.later.key, None)

    def _respond(self, line: bytes, uid: int) -> dict[str, Any] | Later:
        try:
            request = json.loads(line or b"{}")
        except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
            return {"error": f"bad request: {exc}"}
        if not isinstance(request, dict):
            return {"error": "bad request: request is not a JSON object"}
        try:
            return self.answer(request, uid)
        except Exception:  # a bug answering one client must not end the daemon
            log.exception("status socket: cannot answer %.200r", line)
            return {"error": "internal error answering the request; see the daemon's log"}

    def _reply(self, conn: _Connection, reply: dict[str, Any]) -> None:
        """Send what the socket takes now, the rest as the client reads."""
        conn.answer = memoryview(json.dumps(reply).encode() + b"\n")
        self.selector.modify(conn.sock, selectors.EVENT_WRITE, functools.partial(self._on_ready, conn))
        self._send(conn, conn.answer)

    def _send(self, conn: _Connection, answer: memoryview) -> None:
        try:
            conn.answer = answer[conn.sock.send(answer):]
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not conn.answer:
            self._close(conn)

    def _drop(self, conn: _Connection) -> None:
        """End a connection before its end: one waiting for a Later hears `finish(None)` first
        (a small answer, which the socket takes at once), so a client is never left without one."""
        if conn.later is not None and conn.answer is None:
            self._unwait(conn)
            self._reply(conn, conn.later.finish(None))
        if conn in self.connections:  # an answer the client is too slow to take
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        del self.connections[conn]
        self._unwait(conn)
        self.selector.unregister(conn.sock)
        conn.sock.close()


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, as the kernel knows it; -1 if
    it cannot tell (no one the daemon trusts)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return -1
    return struct.unpack("3i", creds)[1]


def query(path: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon and return its answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            _connect(client, path, time.monotonic() + timeout)
            client.sendall(json.dumps(request).encode() + b"\n")
            data = _read_line(client)
    except OSError as exc:
        raise StatusError(f"cannot reach the daemon at {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(data)
    except ValueError:
        raise StatusError(f"unreadable answer from the daemon at {path}") from None


def _connect(client: socket.socket, path: str, deadline: float) -> None:
    """Connect, waiting for room while the daemon's listen queue is full: a Unix socket with a
    timeout does not wait for that but fails at once (EAGAIN), for instance while many idle
    clients wait to be accepted."""
    while True:
        try:
            client.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
