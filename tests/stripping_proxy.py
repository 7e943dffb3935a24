"""An attacker on the path, on loopback: a TCP proxy that takes STARTTLS out of the server's
EHLO reply and keeps every byte the client sent, so a test can say what would have been read.

    with StrippingProxy("127.0.0.3", server.host, server.port) as proxy:
        ...deliver through proxy.host:proxy.port...
    assert b"secret body" not in proxy.from_client
"""

from __future__ import annotations

import socket
import threading

from tests.smtp_servers import WAIT, free_port


class StrippingProxy:
    """Listens on `host` at a free port; each connection is relayed to `upstream`:`port`, the
    server's reply lines `250-STARTTLS` / `250 STARTTLS` dropped (the last line of a reply keeps
    its form: a dropped final line makes the line before it final)."""

    def __init__(self, host: str, upstream: str, upstream_port: int) -> None:
        self.host = host
        self.port = free_port(host)
        self.upstream = (upstream, upstream_port)
        self.from_client = bytearray()  # everything every client sent, in order
        self.stripped = 0  # STARTTLS lines taken out
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, self.port))
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> StrippingProxy:
        self._start(self._accept)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()
        for thread in self._threads:
            thread.join(WAIT)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)  # started first: the `with` block may end and join it at any moment

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream, timeout=WAIT)
            self._sockets += [client, server]
            self._start(self._client_to_server, client, server)
            self._start(self._server_to_client, server, client)

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        while chunk := _receive(client):
            with self._lock:
                self.from_client += chunk
            if not _send(server, chunk):
                break
        _close(server)

    def _server_to_client(self, server: socket.socket, client: socket.socket) -> None:
        pending = b""
        while chunk := _receive(server):
            *lines, pending = (pending + chunk).split(b"\r\n")
            kept = []
            for line in lines:
                if line[4:].upper() == b"STARTTLS":
                    self.stripped += 1
                    if line[3:4] == b" " and kept:  # it ended the reply: the line before ends it now
                        kept[-1] = kept[-1][:3] + b" " + kept[-1][4:]
                    continue
                kept.append(line)
            if kept and not _send(client, b"".join(line + b"\r\n" for line in kept)):
                break
        _close(client)


def _receive(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _send(sock: socket.socket, data: bytes) -> bool:
    """Whether `data` went; a peer gone ends the relay quietly."""
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
