"""The status socket: a Unix socket where the daemon answers one JSON request a connection.

`qrouter status` and later queue commands talk to the running daemon through it. Requests and
answers are one JSON object a line; the socket is mode 0660 so the spool group may ask too.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

MAX_REQUEST = 64 * 1024


class StatusError(RuntimeError):
    pass


def listen(path: str) -> socket.socket:
    """Bind the socket, replacing one a dead daemon left (the spool lock says none runs)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o660)
    server.listen(16)
    server.setblocking(False)
    return server


def serve_one(server: socket.socket, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Answer one waiting client; a slow or broken client costs at most a second."""
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return
    with conn:
        conn.settimeout(1.0)
        try:
            request = json.loads(_read_line(conn) or b"{}")
            if not isinstance(request, dict):
                raise ValueError("request is not a JSON object")
            reply = answer(request)
        except (ValueError, OSError) as exc:
            reply = {"error": f"bad request: {exc}"}
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass


def query(path: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon and return its answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect(path)
            client.sendall(json.dumps(request).encode() + b"\n")
            data = _read_line(client)
    except OSError as exc:
        raise StatusError(f"cannot reach the daemon at {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(data)
    except ValueError:
        raise StatusError(f"unreadable answer from the daemon at {path}") from None


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
