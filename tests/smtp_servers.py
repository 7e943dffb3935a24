"""Real SMTP and LMTP servers on loopback, for the client and transport tests.

`AioServer` runs aiosmtpd, an independent SMTP implementation, with a `Recorder` handler that
keeps what arrived and answers as a test tells it. `ScriptedServer` is a bare socket that plays
a script per connection, for peers aiosmtpd will not imitate: ones that hang, drop the line,
answer garbage, or whose exact bytes on the wire matter. `CountingSink` is a small server of its
own, for counting connections and round trips, and for BDAT, which aiosmtpd does not speak.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP

SERVER_NAME = "mx.example.test"
WAIT = 10.0  # how long a server side waits for the client before giving up on it


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class Received:
    """One message as the server took it."""

    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    content: bytes
    rcpt_options: list[list[str]] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)  # when it was taken


class Recorder:
    """An aiosmtpd handler that records every command and message and answers as told.

    `rcpt` maps an address to its RCPT reply; `max_rcpt` answers 452 4.5.3 beyond that many
    recipients per transaction; `data` is the reply to the end of data; `lmtp` maps an address
    to its own LMTP reply after the data. `extensions` are added to the EHLO reply, `without`
    are taken out of it (keywords).
    """

    def __init__(self, *, rcpt: dict[str, str] | None = None, max_rcpt: int | None = None,
                 data: str | None = None, lmtp: dict[str, str] | None = None,
                 extensions: Sequence[str] = (), without: Sequence[str] = ()) -> None:
        self.rcpt = rcpt or {}
        self.max_rcpt = max_rcpt
        self.data = data
        self.lmtp = lmtp
        self.extensions = list(extensions)
        self.without = {w.upper() for w in without}
        self.messages: list[Received] = []
        self.commands: list[str] = []
        self.hellos: list[str] = []

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.hellos.append(hostname)
        kept = [r for r in responses[1:-1] if r[4:].split(" ")[0].upper() not in self.without]
        return [responses[0], *kept, *(f"250-{e}" for e in self.extensions), responses[-1]]

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.commands.append(f"MAIL {address}")
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 sender ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.commands.append(f"RCPT {address}")
        if address in self.rcpt:
            return self.rcpt[address]
        if self.max_rcpt is not None and len(envelope.rcpt_tos) >= self.max_rcpt:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)
        return "250 2.1.5 recipient ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.commands.append("DATA")
        self.messages.append(Received(envelope.mail_from, list(envelope.mail_options), list(envelope.rcpt_tos),
                                      envelope.original_content, list(envelope.rcpt_options)))
        if self.lmtp is not None:
            return "\r\n".join(self.lmtp.get(r, "250 2.0.0 delivered") for r in envelope.rcpt_tos)
        return self.data or "250 2.0.0 queued as 4711"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.commands.append("RSET")
        return "250 2.0.0 reset"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.commands.append("QUIT")
        return "221 2.0.0 bye"


class _LMTPController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


class _UnixLMTPController(UnixSocketController):
    def factory(self) -> LMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


class AioServer:
    """aiosmtpd on `host` at `port` or a free one (or on a Unix socket), for the length of a `with`.

    Keyword arguments go to aiosmtpd's SMTP class: data_size_limit, enable_SMTPUTF8 (off unless
    asked), tls_context, authenticator, auth_require_tls, auth_exclude_mechanism, timeout...
    """

    def __init__(self, handler: Recorder | None = None, *, host: str = "127.0.0.1", lmtp: bool = False,
                 unix_socket: str | None = None, port: int = 0, **smtp_kwargs: Any) -> None:
        self.handler = handler or Recorder()
        self.host = host
        self.port = 0 if unix_socket else port or free_port(host)  # `port`: that of another host's server
        smtp_kwargs.setdefault("enable_SMTPUTF8", False)
        smtp_kwargs.setdefault("server_hostname", SERVER_NAME)
        self.controller: Controller | UnixSocketController
        if unix_socket:
            kind = _UnixLMTPController if lmtp else UnixSocketController
            self.controller = kind(self.handler, unix_socket=unix_socket, **smtp_kwargs)
        else:
            kind = _LMTPController if lmtp else Controller
            self.controller = kind(self.handler, hostname=host, port=self.port, **smtp_kwargs)

    def __enter__(self) -> AioServer:
        self.controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.controller.stop()


class Peer:
    """One accepted connection as a script sees it: lines in, replies out, nothing hidden."""

    def __init__(self, sock: socket.socket, released: threading.Event | None = None) -> None:
        self.sock = sock
        self.released = released or threading.Event()
        self.buffer = b""
        self.lines: list[str] = []  # every command line the client sent, in order
        sock.settimeout(WAIT)

    def send(self, *replies: str | bytes) -> None:
        """Send reply lines; a str gets CRLF, bytes go as they are."""
        self.sock.sendall(b"".join(r if isinstance(r, bytes) else r.encode() + b"\r\n" for r in replies))

    def line(self) -> str:
        """The next command line, without its CRLF; EOFError if the client hung up."""
        while b"\r\n" not in self.buffer:
            self._fill()
        raw, self.buffer = self.buffer.split(b"\r\n", 1)
        text = raw.decode("utf-8", "replace")
        self.lines.append(text)
        return text

    def expect(self, prefix: str) -> str:
        text = self.line()
        assert text.upper().startswith(prefix.upper()), f"expected {prefix!r}, client sent {text!r}"
        return text

    def data(self) -> bytes:
        """The raw bytes after a 354, up to and including the terminating dot line."""
        while True:
            if self.buffer.startswith(b".\r\n"):
                end = 3
                break
            found = self.buffer.find(b"\r\n.\r\n")
            if found >= 0:
                end = found + 5
                break
            self._fill()
        wire, self.buffer = self.buffer[:end], self.buffer[end:]
        return wire

    def read_some(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def wait_closed(self) -> bytes:
        """Say nothing until the client hangs up (or WAIT passes); what it sent meanwhile."""
        got = b""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            got += chunk
        return got

    def stall(self) -> None:
        """Neither read nor answer until the test is over: a server that stopped reading."""
        self.released.wait(WAIT)

    def greet(self, *extensions: str, verb: str = "EHLO") -> str:
        """220, then a 250 to the client's EHLO (or LHLO) listing `extensions`; the client's name."""
        self.send(f"220 {SERVER_NAME} ESMTP ready")
        return self.hello(*extensions, verb=verb)

    def hello(self, *extensions: str, verb: str = "EHLO") -> str:
        """A 250 to the client's EHLO (or LHLO) listing `extensions`; the client's name."""
        name = self.expect(verb)[5:]
        keywords = [SERVER_NAME, *extensions]
        self.send(*(f"250{'-' if i < len(keywords) - 1 else ' '}{k}" for i, k in enumerate(keywords)))
        return name

    def starttls(self, context: ssl.SSLContext, *extensions: str) -> None:
        """Answer STARTTLS, do the server's side of the handshake, and answer the client's
        EHLO over TLS listing `extensions`."""
        self.expect("STARTTLS")
        self.send("220 2.0.0 ready to start TLS")
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.hello(*extensions)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("client closed the connection")
        self.buffer += chunk


Script = Callable[[Peer], None]


class ScriptedServer:
    """A raw socket server on `host` at a free port: the n-th connection plays the n-th script
    in its own thread. A script's failed assertion fails the test when the `with` block ends."""

    def __init__(self, *scripts: Script, host: str = "127.0.0.1", receive_buffer: int | None = None) -> None:
        self.scripts = list(scripts)
        self.host = host
        self.listener = socket.socket()
        if receive_buffer:  # small, so that a client writing to a server that stops reading blocks soon
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.listener.bind((host, 0))
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.released = threading.Event()  # set when the `with` block ends: stalled scripts go on
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.released.set()
        for thread in self.threads:
            thread.join(WAIT)
        self.stopping.set()
        for peer in self.peers:
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            peer.sock.close()
        self.listener.shutdown(socket.SHUT_RDWR)  # ends the wait in accept() now rather than at its timeout
        self.acceptor.join(WAIT)
        self.listener.close()
        if self.errors and exc_info[0] is None:
            raise self.errors[0]

    @property
    def connections(self) -> int:
        return len(self.peers)

    def _accept(self) -> None:
        for script in self.scripts:
            while not self.stopping.is_set():
                try:
                    sock, _ = self.listener.accept()
                    break
                except TimeoutError:
                    continue
                except OSError:
                    return
            else:
                return
            peer = Peer(sock, self.released)
            self.peers.append(peer)
            thread = threading.Thread(target=self._play, args=(script, peer), daemon=True)
            thread.start()
            self.threads.append(thread)  # started first: the `with` block may end and join it at any moment

    def _play(self, script: Script, peer: Peer) -> None:
        try:
            script(peer)
        except BaseException as exc:
            if not self.stopping.is_set():
                self.errors.append(exc)
        finally:
            try:
                peer.sock.close()
            except OSError:
                pass


class CountingSink:
    """A minimal SMTP (or LMTP) server that answers every read after `delay` seconds (a pipelined
    batch costs one delay, like a round trip), counts the connections open at once (`most`) and
    all it ever had (`connections`), and keeps each message's envelope and data, as stored (no
    dot-stuffing). With `accepting` False it closes every connection at once, as a host that is
    down but still listening.

    `open_by` and `most_by` count the same per client, by the name it gave in EHLO (HELO, LHLO),
    from its greeting on: several senders told apart on one loopback address.

    It offers `extensions` and takes BDAT (RFC 3030) as well as DATA. `conversations` holds, per
    connection, the client's rounds: the command lines that came in before each of the sink's
    answers (a message after DATA shows as its final "."). Replies wait while a BDAT chunk is
    still coming in, so a round is what the client sent before it had to wait for an answer.
    `refuse` maps a recipient to its RCPT reply. `bdat_fails` makes a server that offers
    CHUNKING but fails BDAT: it answers BDAT with that reply and reads the chunk as commands,
    or with "hang up" closes the connection at BDAT without a word."""

    def __init__(self, delay: float = 0.0, host: str = "127.0.0.1", *,
                 extensions: Sequence[str] = ("PIPELINING", "8BITMIME"), refuse: dict[str, str] | None = None,
                 bdat_fails: str = "", lmtp: bool = False) -> None:
        self.delay = delay
        self.extensions = list(extensions)
        self.refuse = refuse or {}
        self.bdat_fails = bdat_fails
        self.lmtp = lmtp
        self.accepting = True
        self.messages: list[Received] = []
        self.conversations: list[list[list[str]]] = []
        self.open = self.most = self.connections = 0
        self.open_by: Counter[str] = Counter()
        self.most_by: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.listener = socket.create_server((host, 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> CountingSink:
        self.acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.listener.shutdown(socket.SHUT_RDWR)  # ends the wait in accept() now rather than at its timeout
        self.acceptor.join(WAIT)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            with self.lock:
                self.connections += 1
            if not self.accepting:
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with self.lock:
            self.open += 1
            self.most = max(self.most, self.open)
        session = _SinkSession(self)
        try:
            sock.settimeout(WAIT)
            self._converse(sock, session)
        except (OSError, EOFError):
            pass
        finally:
            self._ended(session)
            sock.close()

    def _ended(self, session: _SinkSession) -> None:
        """The connection counts no longer: from the answer to QUIT on (a client that has it may
        connect again at once, before this thread runs again to see it close), or once the client
        hung up without one."""
        with self.lock:
            if session.counted:
                session.counted = False
                self.open -= 1
                if session.client:
                    self.open_by[session.client] -= 1

    def _greeted(self, session: _SinkSession, name: str) -> None:
        """A client said its name: its connection counts as its from now on."""
        with self.lock:
            if session.client:
                self.open_by[session.client] -= 1
            session.client = name
            self.open_by[name] += 1
            self.most_by[name] = max(self.most_by[name], self.open_by[name])

    def _converse(self, sock: socket.socket, session: _SinkSession) -> None:
        rounds: list[list[str]] = []
        with self.lock:
            self.conversations.append(rounds)
        time.sleep(self.delay)
        sock.sendall(f"220 {SERVER_NAME} ESMTP\r\n".encode())
        going_on = True
        pending: list[str] = []
        while going_on and not self.stopping.is_set():
            chunk = sock.recv(65536)
            if not chunk:
                return
            replies, going_on = session.feed(chunk)
            pending += replies
            if (pending and session.chunk_left is None) or not going_on:
                rounds.append(session.heard)
                session.heard = []
            if pending and session.chunk_left is None:
                time.sleep(self.delay)
                if not going_on:
                    self._ended(session)
                sock.sendall("".join(f"{reply}\r\n" for reply in pending).encode())
                pending = []


class _SinkSession:
    """The SMTP state of one CountingSink connection: its unparsed input, the transaction, and
    what it has heard since its last answer."""

    def __init__(self, sink: CountingSink) -> None:
        self.sink = sink
        self.buffer = b""
        self.envelope: list[str] = []  # the MAIL command, then the address of each accepted RCPT
        self.in_data = False  # after a 354
        self.chunk_left: int | None = None  # octets of a BDAT chunk still to come
        self.last = False  # that chunk is the LAST one
        self.chunks = b""  # the message so far, from BDAT
        self.heard: list[str] = []
        self.client = ""  # the name it gave in EHLO, HELO or LHLO
        self.counted = True  # in the sink's count of open connections (CountingSink._ended)

    def feed(self, data: bytes) -> tuple[list[str], bool]:
        """The replies to everything complete so far, and False once the session is over."""
        self.buffer += data
        replies: list[str] = []
        while True:
            if self.chunk_left is not None:
                taken, self.buffer = self.buffer[:self.chunk_left], self.buffer[self.chunk_left:]
                self.chunks += taken
                self.chunk_left -= len(taken)
                if self.chunk_left:
                    return replies, True
                self.chunk_left = None
                if self.last:
                    replies += self._end(self.chunks)
                else:
                    replies.append(f"250 2.0.0 {len(self.chunks)} octets so far")
                continue
            if self.in_data:
                found = -2 if self.buffer.startswith(b".\r\n") else self.buffer.find(b"\r\n.\r\n")
                if found == -1:
                    return replies, True
                wire, self.buffer = self.buffer[:found + 2], self.buffer[found + 5:]
                self.heard.append(".")
                self.in_data = False
                replies += self._end((b"\r\n" + wire).replace(b"\r\n.", b"\r\n")[2:])  # unstuffed
                continue
            if b"\r\n" not in self.buffer:
                return replies, True
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            command = line.decode(errors="replace")
            self.heard.append(command)
            verb = command[:4].upper()
            if verb in ("EHLO", "HELO", "LHLO"):
                self.sink._greeted(self, command[5:].strip())
                keywords = [SERVER_NAME, *self.sink.extensions]
                replies.append("\r\n".join(f"250{'-' if i < len(keywords) - 1 else ' '}{k}"
                                            for i, k in enumerate(keywords)))
            elif verb == "MAIL":
                self.envelope, self.chunks = [command], b""
                replies.append("250 2.1.0 ok")
            elif verb == "RCPT":
                address = _path_of(command)
                if address in self.sink.refuse:
                    replies.append(self.sink.refuse[address])
                else:
                    self.envelope.append(address)
                    replies.append("250 2.1.5 ok")
            elif verb == "DATA":
                self.in_data = len(self.envelope) > 1
                replies.append("354 go ahead" if self.in_data else "554 5.5.1 no valid recipients")
            elif verb == "BDAT" and self.sink.bdat_fails == "hang up":
                return [], False
            elif verb == "BDAT" and self.sink.bdat_fails:
                replies.append(self.sink.bdat_fails)
            elif verb == "BDAT":
                size, _, last = command[5:].partition(" ")
                self.chunk_left, self.last = int(size), last.upper() == "LAST"
            elif verb == "QUIT":
                return [*replies, "221 2.0.0 bye"], False
            elif verb in ("RSET", "NOOP"):
                self.envelope, self.chunks = [], b""
                replies.append("250 2.0.0 ok")
            else:
                replies.append("500 5.5.2 command not recognized")

    def _end(self, content: bytes) -> list[str]:
        """Take the message (if any recipient was accepted); the reply, or one per recipient
        over LMTP."""
        mail, recipients = self.envelope[:1], self.envelope[1:]
        self.envelope, self.chunks = [], b""
        if not recipients:
            return ["554 5.5.1 no valid recipients"]
        options = mail[0].partition(">")[2].split()
        with self.sink.lock:
            self.sink.messages.append(Received(_path_of(mail[0]), options, recipients, content))
        if self.sink.lmtp:
            return [f"250 2.0.0 <{r}> delivered" for r in recipients]
        return ["250 2.0.0 queued"]


def _path_of(command: str) -> str:
    """The address in `MAIL FROM:<a> ...` or `RCPT TO:<a> ...`."""
    return command[command.index("<") + 1:command.index(">")]
