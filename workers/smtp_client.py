"""The SMTP and LMTP client the delivery transport speaks through: blocking sockets, one
message at a time.

A forked worker delivers one message at a time, so plain sockets with a deadline per command
(RFC 5321 4.5.3.2) are simpler to reason about than an event loop. Every problem with the peer
(a timeout, a lost connection, a 421, a malformed or oversized reply) closes the connection and
becomes a temporary failure for each recipient that has no final answer yet: a caller never has
to guess what state a session is in, and an open connection is always a clean one.

    client = SMTPClient.connect("mx.example.org", 25, ip="192.0.2.7", helo_name="relay.example.net")
    replies = client.send(sender, recipients, message, ret="HDRS", envid="...")  # one per recipient
    if client.is_alive():       # later: the server has not hung up, so the next message can follow
        ...
    client.close()              # QUIT

`connect` raises SMTPError (TLSFallback under the `may` TLS level when the handshake failed,
TLSFailure when a level above `may` is not met: policy/tls_policy.py);
`send` never raises for anything the peer does, it answers every recipient.

Where the server offers CHUNKING (RFC 3030) the message goes as one `BDAT n LAST`, pipelined with
MAIL and RCPT when the server pipelines: a message then costs one round trip, not two. A server
that offers CHUNKING but fails BDAT (answers it as an unknown command, or hangs up at it) is
named in `bdat_failure`; the caller connects again with chunking=False and sends with DATA.

What a message becomes on the wire is workers/smtp_wire.py; what a reply says and means,
workers/smtp_reply.py.
"""

from __future__ import annotations

import base64
import re
import select
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import NoReturn, Protocol

from policy.tls_policy import LEVELS, NAMED_LEVELS, TLS_MAY, TLS_NONE, TLSPolicy
from policy.tls_report import (
    CERTIFICATE_HOST_MISMATCH,
    CERTIFICATE_NOT_TRUSTED,
    STARTTLS_NOT_SUPPORTED,
    TLSA_INVALID,
    VALIDATION_FAILURE,
)
from router.config.timeouts import Timeouts
from router.spool.dsn import NOTIFY
from workers import tls
from workers.smtp_reply import GREETING, Reply, extensions, known_reply, local_reply, reply_text, too_many
from workers.smtp_wire import body, stuff

SMTP_PORT, LMTP_PORT = 25, 24
MAX_LINE = 2048  # RFC 5321 allows 512 per reply line; leave room for chatty servers
MAX_REPLY = 64 * 1024  # a multi-line reply larger than this is a hostile or broken peer
PIPELINE_BATCH = 100  # commands per write: the replies to them fit in socket buffers, so no deadlock
CHUNK = 64 * 1024  # one "data block" of RFC 5321 4.5.3.2.5, each with its own timeout

BODY, END_OF_DATA, BDAT = "message body", "end of DATA", "BDAT"
# Replies to BDAT from a server that does not know it, whatever it offered: it read the chunk as
# commands, so nothing it says next can be trusted. 503 counts too once a recipient was accepted.
_BDAT_UNKNOWN = frozenset({500, 501, 502, 504})

_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
_CONTROL_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f]")  # would break the command line
_HOST_NAME = re.compile(r"[\x21-\x7e]+")


class SMTPError(Exception):
    """The session could not be set up, or a command on it failed; `reply.status` says whether
    to defer or bounce, `reply.describe(peer)` what to log. The connection is closed."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


class _TLSProblem(SMTPError):
    """A TLS session that could not be set up. `result_type` names what failed as TLS reports
    do (policy/tls_report.py), "" for a fault of our own (a CA file that cannot be read);
    `local_ip` is the address we connected from."""

    def __init__(self, reply: Reply, result_type: str = VALIDATION_FAILURE, local_ip: str = ""):
        super().__init__(reply)
        self.result_type = result_type
        self.local_ip = local_ip


class TLSFallback(_TLSProblem):
    """Only under the `may` policy: the server offered and accepted STARTTLS but the handshake
    failed. The connection is closed; connecting again at once with tls=TLS_NONE is the remedy
    (as Postfix does), since a server that cannot do TLS usually can do without it."""


class TLSFailure(_TLSProblem):
    """A level above `may` was not met: no STARTTLS, a failed handshake, a certificate that did
    not pass. Nothing of a transaction was sent; the message waits (4.7.x)."""


def refused(peer: str, policy: TLSPolicy) -> TLSFailure:
    """The failure of a server its TLS policy will not let us use (its `refusal`, e.g. DANE's
    reason), for the caller to raise before connecting."""
    return TLSFailure(local_reply(454, "4.7.5", f"not connecting to {peer}: {policy.refusal}", "connect"),
                      policy.refusal_type or VALIDATION_FAILURE)


class _Lost(SMTPError):
    """The connection broke under us (reset, or closed by the server), as opposed to a timeout:
    what a server that offers CHUNKING but cannot take BDAT may do when it meets one."""


class RecipientLike(Protocol):
    """What `send` needs of a recipient; router.spool.queue_file.Recipient is one."""

    address: str
    notify: str
    orcpt: str


class SMTPClient:
    """One SMTP or LMTP session. Make it with `connect` or `connect_unix`."""

    def __init__(self, sock: socket.socket, peer: str, *, helo_name: str, lmtp: bool, timeouts: Timeouts,
                 local: bool, chunking: bool = True) -> None:
        sock.setblocking(False)  # deadlines are ours (_wait): no timeout switching per command
        self._sock: socket.socket | None = sock
        self._poller = select.poll()
        self._buffer = bytearray()
        self._dirty = False  # a MAIL was sent since the last RSET
        self._local = local  # a Unix socket: nobody on the wire to hide credentials from
        self.peer = peer
        self.local_ip = "" if sock.family == socket.AF_UNIX else sock.getsockname()[0]  # for TLS reports
        self.helo_name = helo_name
        self.lmtp = lmtp
        self.timeouts = timeouts
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls = ""  # "TLSv1.3 with cipher ..." once encrypted
        self.tls_trust = ""  # Verified, Untrusted or Anonymous once encrypted (workers/tls.py)
        self.authenticated = False
        self.transactions = 0
        self.messages = 0  # messages delivered over it, each in one transaction or more (counted by the transport)
        self.use_chunking = chunking  # BDAT if offered; False for a server known to fail it
        self.bdat_failure: Reply | None = None  # why, when this server failed BDAT (see send)
        self._bdat_answered = False  # a BDAT was answered on this connection: the server knows it

    @property
    def tls_verified(self) -> bool:
        """Whether the server's certificate passed the checks of a level that has some."""
        return self.tls_trust == tls.VERIFIED

    # -- setting up ------------------------------------------------------------------------

    @classmethod
    def connect(cls, host: str, port: int, *, helo_name: str, ip: str | None = None, lmtp: bool = False,
                timeouts: Timeouts | None = None, tls: str | TLSPolicy = TLS_MAY, tls_name: str | None = None,
                ca_file: str | None = None, auth: tuple[str, str] | None = None,
                allow_plaintext_auth: bool = False, bind: str | None = None, chunking: bool = True) -> SMTPClient:
        """Connect over TCP to `ip` (or `host` resolved by the system), read the greeting,
        EHLO (LHLO), STARTTLS as `tls` asks (a level or a whole TLSPolicy), AUTH if `auth` is
        given. The peer is known as `host[ip]:port`. A certificate is verified (under the levels
        that check names) against the policy's `match`, else `tls_name`, by default `host`, with
        `ca_file` or the system's CA store. With `chunking` False messages go with DATA even if
        the server offers CHUNKING."""
        policy = tls if isinstance(tls, TLSPolicy) else TLSPolicy(tls)
        _check_setup(helo_name, policy.level)
        timeouts = timeouts or Timeouts()
        where = f"{host}[{ip}]:{port}" if ip else f"{host}:{port}"
        try:
            sock = socket.create_connection((ip or host, port), timeout=timeouts.connect,
                                            source_address=(bind, 0) if bind else None)
        except socket.gaierror as exc:
            raise SMTPError(local_reply(421, "4.4.4", f"connect to {where}: {_reason(exc)}", "connect")) from None
        except OSError as exc:
            raise SMTPError(local_reply(421, "4.4.1", f"connect to {where}: {_reason(exc)}", "connect")) from None
        peer = f"{host}[{ip or sock.getpeername()[0]}]:{port}"
        client = cls(sock, peer, helo_name=helo_name, lmtp=lmtp, timeouts=timeouts, local=False, chunking=chunking)
        client._start(policy, (tls_name or host).lower(), ca_file, auth, allow_plaintext_auth)
        return client

    @classmethod
    def connect_unix(cls, path: str, *, helo_name: str, lmtp: bool = True, timeouts: Timeouts | None = None,
                     auth: tuple[str, str] | None = None, chunking: bool = True) -> SMTPClient:
        """Connect to a Unix socket (`lmtp:/path`); the peer is known as `unix[/path]`. No TLS:
        the socket never leaves the machine, which is also why credentials may go over it."""
        _check_setup(helo_name, TLS_NONE)
        timeouts = timeouts or Timeouts()
        peer = f"unix[{path}]"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeouts.connect)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise SMTPError(local_reply(421, "4.4.1", f"connect to {peer}: {_reason(exc)}", "connect")) from None
        client = cls(sock, peer, helo_name=helo_name, lmtp=lmtp, timeouts=timeouts, local=True, chunking=chunking)
        client._start(TLSPolicy(TLS_NONE), "", None, auth, False)
        return client

    def _start(self, policy: TLSPolicy, tls_name: str, ca_file: str | None,
               auth: tuple[str, str] | None, allow_plaintext_auth: bool) -> None:
        try:
            greeting = self._read(GREETING, self.timeouts.greeting)
            if greeting.code != 220:
                if greeting.code // 100 not in (4, 5):  # never let a failed session read as "sent"
                    greeting = local_reply(421, "4.5.0", f"host {self.peer} greeted with {greeting}", GREETING)
                self._give_up(greeting)
            self._hello()
            if policy.level != TLS_NONE:
                self._starttls(policy, tls_name, ca_file)
            if auth:
                self._auth(auth[0], auth[1], allow_plaintext_auth)
        except BaseException:
            self.abort()
            raise

    def _hello(self) -> None:
        """EHLO, or HELO when EHLO is refused; LHLO for LMTP, which has no fallback."""
        verb = "LHLO" if self.lmtp else "EHLO"
        reply = self._command(f"{verb} {self.helo_name}", verb, self.timeouts.helo)
        if not self.lmtp and reply.code // 100 == 5:
            reply = self._command(f"HELO {self.helo_name}", "HELO", self.timeouts.helo)
            if reply.ok:
                self.esmtp, self.extensions = False, {}
                return
        if not reply.ok:
            self._give_up(reply)
        self.esmtp, self.extensions = True, extensions(reply.lines[1:])

    def _starttls(self, policy: TLSPolicy, tls_name: str, ca_file: str | None) -> None:
        """STARTTLS as `policy` asks, naming `tls_name` in SNI (under DANE, the name the TLSA
        records are at: RFC 7672 8.1); a certificate must match the policy's names, else
        `tls_name`. Under every level but `may`, a server that does not offer or accept it, a
        failed handshake or a certificate that does not pass ends the session (4.7.x) before
        any command of a transaction: nothing goes in clear."""
        names = policy.match or (tls_name,)
        sni = policy.tlsa_base or tls_name
        required = "TLS is required"
        if policy.tlsa:
            required = f"TLS is required (DANE: {sni} has TLSA records)"
        elif policy.tlsa_unusable:
            required = f"TLS is required (DANE: {sni} has TLSA records, none of them usable)"
        if "STARTTLS" not in self.extensions:
            if policy.required:
                self._tls_failed(local_reply(454, "4.7.4", f"{required}, but was not offered by host {self.peer}"),
                                 STARTTLS_NOT_SUPPORTED)
            return
        try:
            context = tls.context(policy, ca_file)
        except (OSError, ValueError) as exc:
            self._tls_failed(local_reply(454, "4.7.5", f"cannot load CA file {ca_file}: {_reason(exc)}"), "")
        reply = self._command("STARTTLS", "STARTTLS", self.timeouts.starttls)
        if reply.code != 220:
            if policy.required:
                self._tls_failed(local_reply(454, "4" + reply.dsn[1:], f"{required}, but {reply.describe(self.peer)}"),
                                 STARTTLS_NOT_SUPPORTED)
            return  # `may`: RFC 3207 lets the session go on unencrypted
        if self._buffer:  # read before the handshake, so not from the TLS peer: someone injected it
            self._fail("STARTTLS", "4.5.0", f"host {self.peer} sent data after its STARTTLS reply")
        assert self._sock is not None
        try:
            sock = context.wrap_socket(self._sock, server_hostname=sni or None,
                                       do_handshake_on_connect=False)
            self._sock = sock
            sock.settimeout(self.timeouts.starttls)
            sock.do_handshake()
            sock.setblocking(False)
        except (OSError, ValueError) as exc:
            self.abort()
            if not policy.required:  # the certificate is not checked: only the handshake itself can fail
                raise TLSFallback(local_reply(454, "4.7.5", f"TLS handshake with {self.peer} failed: "
                                                            f"{_tls_reason(exc)}"), local_ip=self.local_ip) from None
            if isinstance(exc, ssl.SSLCertVerificationError):
                text = f"server certificate of {self.peer} not verified for {', '.join(names)}: {exc.verify_message}"
            else:
                text = f"{required}, but the handshake with {self.peer} failed: {_tls_reason(exc)}"
            raise TLSFailure(local_reply(454, "4.7.5", text), tls.result_type(exc), self.local_ip) from None
        problem = tls.check_peer(sock, policy, names)
        if problem:
            self.abort()
            raise TLSFailure(local_reply(454, "4.7.5", f"server certificate of {self.peer} {problem}"),
                             _mismatch(policy), self.local_ip)
        self.tls = tls.describe(sock)
        self.tls_trust = tls.trust(sock, policy)
        self._hello()

    def _auth(self, user: str, password: str, allow_plaintext: bool) -> None:
        """AUTH PLAIN, else LOGIN. Every failure defers: a wrong password is an administrator's
        mistake to fix, not a reason to return mail to its sender."""
        mechanisms = self.auth_mechanisms
        if not mechanisms:
            self._give_up(local_reply(454, "4.7.0", f"credentials are configured but host {self.peer} offers no AUTH"))
        if "PLAIN" not in mechanisms and "LOGIN" not in mechanisms:
            self._give_up(local_reply(454, "4.7.0", f"no SASL mechanism in common with host {self.peer} "
                                                    f"(it offers {' '.join(sorted(mechanisms))}; we do PLAIN, LOGIN)"))
        if not (self.tls or self._local or allow_plaintext):
            self._give_up(local_reply(454, "4.7.0", f"not sending credentials to host {self.peer} "
                                                    "over an unencrypted connection"))
        timeout = self.timeouts.auth
        if "PLAIN" in mechanisms:
            token = _b64(b"\0" + user.encode() + b"\0" + password.encode())
            reply = self._command(f"AUTH PLAIN {token}", "AUTH", timeout)
        else:
            reply = self._command("AUTH LOGIN", "AUTH", timeout)
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = self._command(_b64(secret.encode()), "AUTH", timeout)
        if reply.code == 334:  # the server wants more than PLAIN or LOGIN give: cancel
            self._command("*", "AUTH", timeout)
        if reply.code != 235:
            self._give_up(local_reply(454, "4" + reply.dsn[1:], f"SASL authentication failed; "
                                                                f"{reply.describe(self.peer)}"))
        self.authenticated = True

    # -- what the session offers -----------------------------------------------------------

    @property
    def pipelining(self) -> bool:
        """LMTP servers must pipeline (RFC 2033 4.1), advertised or not."""
        return "PIPELINING" in self.extensions or self.lmtp

    @property
    def chunking(self) -> bool:
        """Whether messages go with BDAT (RFC 3030): offered, and not turned off."""
        return self.use_chunking and "CHUNKING" in self.extensions

    @property
    def size_limit(self) -> int | None:
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(self.extensions.get("AUTH", "").upper().split())

    # -- sending ---------------------------------------------------------------------------

    def send(self, sender: str, recipients: Sequence[str | RecipientLike], message: bytes, *, ret: str = "",
             envid: str = "") -> list[Reply]:
        """One transaction: answers one Reply per recipient, in order, and never raises for
        anything the peer does.

        A recipient's reply is final: the answer to the end of data or to BDAT LAST (LMTP: its
        own), else to DATA, RCPT or MAIL, whichever stopped it; or one of ours (SIZE, SMTPUTF8, a
        timeout, a lost connection, all `local`). Recipients with `unsent` set met the server's
        recipient limit and may go in a new transaction right away. DSN parameters (NOTIFY and
        ORCPT from each recipient, `ret`, `envid`, all unencoded) go only to a server that offers
        DSN. When the server turns out to fail BDAT, `bdat_failure` says how, and the recipients
        it did not refuse are deferred: a new session with chunking=False is the remedy.
        """
        rcpts = [(r, "", "") if isinstance(r, str) else (r.address, r.notify, r.orcpt) for r in recipients]
        results: list[Reply | None] = [None] * len(rcpts)
        if not rcpts:
            return []
        if self._sock is None:
            return [local_reply(421, "4.4.2", f"connection with {self.peer} is closed", "MAIL FROM")] * len(rcpts)
        data, binary = body(message, binarymime=self.chunking and "BINARYMIME" in self.extensions)
        self._refuse_locally(sender, [r[0] for r in rcpts], len(data), results)
        try:
            if any(r is None for r in results):
                self._transaction(sender, rcpts, data, binary, message, ret, envid, results)
        except SMTPError as exc:
            results = [r or exc.reply for r in results]
        except BaseException:
            self.abort()
            raise
        assert all(results)
        return [r for r in results if r]

    def verify(self, sender: str, recipient: str) -> Reply:
        """Whether the server takes `recipient` from `sender`, asked as a delivery asks (MAIL FROM,
        RCPT TO) and taken back at once (RSET): no message is sent. The reply to RCPT, or to MAIL
        when the server refuses the sender; SMTPError when the session fails."""
        reply = self._command(f"MAIL FROM:<{sender}>", "MAIL FROM", self.timeouts.mail)
        if reply.ok:
            reply = self._command(f"RCPT TO:<{recipient}>", "RCPT TO", self.timeouts.rcpt)
        self._rset()
        return reply

    def _refuse_locally(self, sender: str, addresses: list[str], size: int, results: list[Reply | None]) -> None:
        """Answer what the server cannot take, without asking it."""
        everyone = range(len(addresses))
        limit = self.size_limit
        if _CONTROL_IN_ADDRESS.search(sender):
            self._answer(results, everyone, local_reply(553, "5.1.7", f"bad sender address syntax: <{sender}>"))
        elif limit and size > limit:
            self._answer(results, everyone, local_reply(552, "5.3.4", f"message size {size} exceeds size limit "
                                                                      f"{limit} of server {self.peer}"))
        elif "SMTPUTF8" not in self.extensions and not sender.isascii():
            self._answer(results, everyone, local_reply(553, "5.6.7", f"SMTPUTF8 is required for sender <{sender}>, "
                                                                      f"but was not offered by host {self.peer}"))
        for index, address in enumerate(addresses):
            if _CONTROL_IN_ADDRESS.search(address) and not results[index]:
                results[index] = local_reply(553, "5.1.3", f"bad recipient address syntax: <{address}>")
            elif "SMTPUTF8" not in self.extensions and not address.isascii() and not results[index]:
                results[index] = local_reply(553, "5.6.7", "SMTPUTF8 is required, but was not offered by host "
                                                           f"{self.peer}")

    @staticmethod
    def _answer(results: list[Reply | None], indexes: Sequence[int], reply: Reply) -> None:
        for index in indexes:
            if results[index] is None:
                results[index] = reply

    def _transaction(self, sender: str, rcpts: list[tuple[str, str, str]], data: bytes, binary: bool,
                     message: bytes, ret: str, envid: str, results: list[Reply | None]) -> None:
        """With PIPELINING the whole envelope is one write (RFC 2920): RSET if the connection
        was used, MAIL, the RCPTs and DATA, so a message costs two round trips, not four. With
        CHUNKING too, BDAT LAST and the message itself go in that write: one round trip."""
        reset = self._dirty
        if reset and not self.pipelining:
            self._rset()
        self._dirty = True
        self.transactions += 1
        todo = [i for i, r in enumerate(results) if r is None]
        dsn = "DSN" in self.extensions
        mail = f"MAIL FROM:<{sender}>{self._mail_parameters(sender, rcpts, todo, data, binary, message, ret, envid)}"
        commands = [mail] + [f"RCPT TO:<{rcpts[i][0]}>{_rcpt_parameters(*rcpts[i], dsn)}" for i in todo]
        chunk = data if self.chunking else None
        accepted, pipelined = self._envelope(commands, todo, results, reset=reset and self.pipelining, chunk=chunk)
        if chunk is not None:
            self._bdat(chunk, accepted, pipelined, results)
            return
        reply = self._read("DATA", self.timeouts.data) if pipelined else None
        if reply is not None and not accepted and reply.code // 100 not in (4, 5):
            self.abort()  # DATA went through with no recipient to send to: never start a message
        if not accepted:
            return
        if reply is None:
            reply = self._command("DATA", "DATA", self.timeouts.data)
        if reply.code // 100 in (4, 5):
            self._answer(results, accepted, reply)
            return
        if reply.code != 354:  # a "250" here would claim a delivery that never happened
            self._fail("DATA", "4.5.0", f"host {self.peer} answered DATA with {reply}")
        self._write_body(stuff(data))
        if self.lmtp:
            for index in accepted:
                results[index] = self._read(END_OF_DATA, self.timeouts.dot)
        else:
            self._answer(results, accepted, self._read(END_OF_DATA, self.timeouts.dot))

    def _bdat(self, chunk: bytes, accepted: list[int], pipelined: bool, results: list[Reply | None]) -> None:
        """The message as one BDAT LAST chunk, unless `pipelined` already sent it with the
        envelope, and the reply: one for all, or with LMTP one per accepted recipient.

        A chunk cannot be taken back: with no recipient accepted the server still reads it and
        refuses it (RFC 3030 says it must read it), and the RCPT replies stand. A reply that
        shows the server does not know BDAT (or its silence: see _bdat_lost) makes this server
        one that fails BDAT, and the session ends, since it read the message as commands."""
        if not pipelined:
            if not accepted:
                return  # nothing to send it to, and nothing sent: the next transaction starts with RSET
            try:
                self._write_body(chunk, f"BDAT {len(chunk)} LAST\r\n".encode())
            except _Lost as exc:
                self._bdat_lost(exc)
        try:
            reply = self._read(BDAT, self.timeouts.dot)
        except _Lost as exc:
            self._bdat_lost(exc)
        if reply.code // 100 not in (2, 4, 5) or reply.code in _BDAT_UNKNOWN or (accepted and reply.code == 503):
            self.bdat_failure = reply
            self._fail(BDAT, "4" + reply.dsn[1:], f"{reply.describe(self.peer)}, though it offers CHUNKING")
        self._bdat_answered = True
        if not accepted:
            return
        if self.lmtp:
            results[accepted[0]] = reply
            for index in accepted[1:]:
                results[index] = self._read(BDAT, self.timeouts.dot)
        else:
            self._answer(results, accepted, reply)

    def _bdat_lost(self, exc: _Lost) -> NoReturn:
        """The connection broke while the chunk went out or before its reply came: on a
        connection that has had no BDAT answered yet, the server is taken to fail BDAT."""
        if not self._bdat_answered:
            self.bdat_failure = exc.reply
        raise exc

    def _mail_parameters(self, sender: str, rcpts: list[tuple[str, str, str]], todo: list[int], data: bytes,
                         binary: bool, message: bytes, ret: str, envid: str) -> str:
        """Only what the server offered: RFC 1870 SIZE, RFC 6152 and RFC 3030 BODY, RFC 6531
        SMTPUTF8, RFC 3461 RET and ENVID."""
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={len(data)}")
        if binary:
            params.append("BODY=BINARYMIME")
        elif "8BITMIME" in self.extensions and not message.isascii():
            params.append("BODY=8BITMIME")
        end = data.find(b"\r\n\r\n")
        header = data[:end] if end >= 0 else data
        international = not sender.isascii() or any(not rcpts[i][0].isascii() for i in todo)
        if "SMTPUTF8" in self.extensions and (international or not header.isascii()):
            params.append("SMTPUTF8")
        if "DSN" in self.extensions:
            if ret.upper() in ("FULL", "HDRS"):
                params.append(f"RET={ret.upper()}")
            if envid:
                params.append(f"ENVID={xtext(envid)}")
        return "".join(f" {p}" for p in params)

    def _envelope(self, commands: list[str], todo: list[int], results: list[Reply | None], reset: bool,
                  chunk: bytes | None) -> tuple[list[int], bool]:
        """MAIL and the RCPTs, all in one write per batch when the server pipelines, after RSET
        if `reset`; the last batch ends with DATA, or with BDAT LAST and the `chunk` itself when
        it is given. Answers the recipients refused; returns the indexes of those accepted, and
        whether DATA or BDAT went out, so that its reply is next."""
        pipelining = self.pipelining
        batch = PIPELINE_BATCH if pipelining else 1
        accepted: list[int] = []
        mail: Reply | None = None
        limit: Reply | None = None  # the "too many recipients" reply, once met
        sent = 0
        with_last = False
        while sent < len(commands) and limit is None and (mail is None or mail.ok):
            group = commands[sent:sent + batch]
            with_last = pipelining and sent + len(group) == len(commands)
            last = ("DATA" if chunk is None else f"BDAT {len(chunk)} LAST") if with_last else ""
            lines = ["RSET"] * (reset and sent == 0) + group + [last] * with_last
            wire = "".join(f"{line}\r\n" for line in lines).encode()
            bdat = chunk if with_last else None  # the chunk goes in this write
            # A server may hold its replies until it has taken the chunk, as it holds the one to a dot.
            patience = self.timeouts.dot if bdat is not None else 0.0
            try:
                if bdat is not None:
                    self._write_body(bdat, wire)
                else:
                    self._write(wire, "RSET" if reset and sent == 0 else "MAIL FROM" if sent == 0 else "RCPT TO",
                                self.timeouts.mail if sent == 0 else self.timeouts.rcpt)
                if reset and sent == 0:
                    self._check_rset(self._read("RSET", max(self.timeouts.rset, patience)))
                for position in range(sent, sent + len(group)):
                    if position == 0:
                        mail = self._read("MAIL FROM", max(self.timeouts.mail, patience))
                        continue
                    reply = self._read("RCPT TO", max(self.timeouts.rcpt, patience))
                    index = todo[position - 1]
                    assert mail is not None
                    if not mail.ok:
                        results[index] = mail
                    elif reply.ok:
                        accepted.append(index)
                    elif accepted and too_many(reply):
                        limit = limit or reply
                        results[index] = replace(reply, unsent=True)
                    else:
                        results[index] = reply
            except _Lost as exc:
                if bdat is not None and (mail is None or mail.ok):  # not a server that refused MAIL and hung up
                    self._bdat_lost(exc)
                raise
            sent += len(group)
        assert mail is not None
        left = todo[sent - 1:]  # commands[k] is the RCPT of todo[k - 1]
        if left:
            self._answer(results, left, mail if not mail.ok else replace(limit or mail, unsent=True))
        return accepted, with_last

    def _write_body(self, wire: bytes, head: bytes = b"") -> None:
        """The message in blocks of CHUNK, each within the `block` timeout. `head`, the commands
        pipelined before it, shares the first block's write: in a write of its own it would make
        the message wait for the server's acknowledgement (Nagle's algorithm)."""
        view = memoryview(wire)
        self._write(head + view[:CHUNK] if head else view[:CHUNK], BODY, self.timeouts.block)
        for start in range(CHUNK, len(view), CHUNK):
            self._write(view[start:start + CHUNK], BODY, self.timeouts.block)

    # -- keeping a connection --------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Not closed by us (`is_alive` also asks the socket whether the server hung up)."""
        return self._sock is not None

    def is_alive(self) -> bool:
        """Whether a kept connection still looks usable, without a round trip: open, and the
        server has said nothing unasked (a 421 or the end of the connection). Closes it if not."""
        sock = self._sock
        if sock is None:
            return False
        try:
            pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            readable = bool(self._buffer) or pending or self._ready(select.POLLIN, 0)
        except (OSError, ValueError):
            readable = True
        if readable:
            self.abort()
        return not readable

    def _rset(self) -> None:
        self._check_rset(self._command("RSET", "RSET", self.timeouts.rset))
        self._dirty = False

    def _check_rset(self, reply: Reply) -> None:
        """A server that will not reset is in a state we cannot trust: close the connection."""
        if not reply.ok:
            self.abort()
            raise SMTPError(local_reply(421, "4" + reply.dsn[1:], f"{reply.describe(self.peer)}; connection closed",
                                        "RSET"))

    def close(self, wait: float | None = None) -> None:
        """QUIT and close; never raises, and may be called again. `wait`: at most this long for
        the reply to QUIT, if less than the quit timeout; 0 closes without QUIT."""
        timeout = self.timeouts.quit if wait is None else min(wait, self.timeouts.quit)
        if self.is_alive() and timeout > 0:
            try:
                self._command("QUIT", "QUIT", timeout)
            except SMTPError:
                pass
        self.abort()

    def abort(self) -> None:
        """Close without QUIT: for a connection in an unknown state."""
        sock, self._sock = self._sock, None
        self._buffer.clear()
        if sock is not None:
            sock.close()

    def __enter__(self) -> SMTPClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _give_up(self, reply: Reply) -> NoReturn:
        """End a session that cannot go on, politely (QUIT), and say why."""
        self.close()
        raise SMTPError(reply)

    def _tls_failed(self, reply: Reply, result_type: str) -> NoReturn:
        """End a session whose TLS level is not met, politely (QUIT), and say why."""
        self.close()
        raise TLSFailure(reply, result_type, self.local_ip)

    # -- the wire --------------------------------------------------------------------------

    def _command(self, line: str, what: str, timeout: float) -> Reply:
        self._write(line.encode() + b"\r\n", what, timeout)
        return self._read(what, timeout)

    def _write(self, data: bytes | memoryview, what: str, timeout: float) -> None:
        """Write all of `data` within `timeout`. The socket is tried first and polled only when
        full, so a command costs one system call."""
        sock = self._sock
        if sock is None:
            raise SMTPError(local_reply(421, "4.4.2", f"connection with {self.peer} is closed", what))
        view = memoryview(data)
        deadline = 0.0
        while view:
            try:
                view = view[sock.send(view):]
                continue
            except (BlockingIOError, ssl.SSLWantWriteError):
                wanted = select.POLLOUT
            except ssl.SSLWantReadError:  # TLS renegotiation: it must read first
                wanted = select.POLLIN
            except OSError as exc:
                self._fail(what, "4.4.2", f"lost connection with {self.peer} while {_doing(what)} ({_reason(exc)})",
                           _Lost)
            deadline = deadline or time.monotonic() + timeout
            self._wait(wanted, what, deadline)

    def _read(self, what: str, timeout: float) -> Reply:
        """Read one whole reply within `timeout`; a 421 ends the session (RFC 5321 3.8).

        Replies to pipelined commands usually arrive together, so most are already in the
        buffer: the clock is read only when there is something to wait for."""
        deadline = 0.0
        lines: list[bytes] = []
        size = 0
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", 0, MAX_LINE)
            if end < 0:
                deadline = deadline or time.monotonic() + timeout
                self._receive(what, deadline)
                continue
            line = bytes(buffer[:end]).rstrip(b"\r")
            del buffer[:end + 1]
            size += len(line)
            if size > MAX_REPLY:
                self._fail(what, "4.5.0", f"host {self.peer} sent a reply longer than {MAX_REPLY} bytes "
                                          f"while {_doing(what)}")
            code, separator = line[:3], line[3:4]
            if (not code.isdigit() or code[:1] not in (b"2", b"3", b"4", b"5") or separator not in (b"", b" ", b"-")
                    or (lines and code != lines[0][:3])):
                self._fail(what, "4.5.0", f"host {self.peer} sent a malformed reply while {_doing(what)}: "
                                          f"{reply_text(line[:100])!r}")
            lines.append(line)
            if separator != b"-":
                break
        reply = known_reply(lines, what)
        if reply.code == 421 and what != "QUIT":
            self.abort()
            raise SMTPError(reply)
        return reply

    def _receive(self, what: str, deadline: float) -> None:
        """Add what the server sends next to the buffer, which holds no whole line yet."""
        if len(self._buffer) >= MAX_LINE:
            self._fail(what, "4.5.0", f"host {self.peer} sent a reply line longer than {MAX_LINE} bytes "
                                      f"while {_doing(what)}")
        sock = self._sock
        if sock is None:
            self._fail(what, "4.4.2", f"connection with {self.peer} is closed")
        while True:
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):  # else decrypted bytes are waiting
                self._wait(select.POLLIN, what, deadline)
            try:
                chunk = sock.recv(CHUNK)
                break
            except (BlockingIOError, ssl.SSLWantReadError):  # woken early, or half a TLS record
                continue
            except OSError as exc:
                self._fail(what, "4.4.2", f"lost connection with {self.peer} while {_doing(what)} "
                                          f"({_reason(exc)})", _Lost)
        if not chunk:
            self._fail(what, "4.4.2", f"lost connection with {self.peer} while {_doing(what)}", _Lost)
        self._buffer += chunk

    def _wait(self, events: int, what: str, deadline: float) -> None:
        """Until the socket is ready for `events` (or has hung up); a timeout ends the session."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._ready(events, remaining):
            self._fail(what, "4.4.2", f"conversation with {self.peer} timed out while {_doing(what)}")

    def _ready(self, events: int, seconds: float) -> bool:
        assert self._sock is not None
        self._poller.register(self._sock, events)  # a dict update: the system call is poll() alone
        return bool(self._poller.poll(seconds * 1000))

    def _fail(self, what: str, dsn: str, text: str, error: type[SMTPError] = SMTPError) -> NoReturn:
        """The connection is no longer trustworthy: drop it and defer."""
        self.abort()
        raise error(local_reply(421, dsn, text, what))


# -- helpers ----------------------------------------------------------------------------------


def _check_setup(helo_name: str, tls: str) -> None:
    if not _HOST_NAME.fullmatch(helo_name):
        raise ValueError(f"helo_name {helo_name!r} is not a host name")
    if tls not in LEVELS:
        raise ValueError(f"unknown TLS policy {tls!r} (known: {', '.join(LEVELS)})")


def _rcpt_parameters(address: str, notify: str, orcpt: str, dsn: bool) -> str:
    if not dsn:
        return ""
    params = ""
    if NOTIFY.fullmatch(notify.upper().replace(" ", "")):
        params += f" NOTIFY={notify.upper().replace(' ', '')}"
    if orcpt:
        params += f" ORCPT={_orcpt(orcpt)}"
    return params


def xtext(text: str) -> str:
    """RFC 3461 xtext: printable ASCII but `+` and `=` as is, every other byte as +HH."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
                   for c in text)


def _orcpt(value: str) -> str:
    """ORCPT from `type;address` (or a bare address, taken as rfc822): xtext for an ASCII
    address, RFC 6533 utf-8-addr-xtext for an internationalized one."""
    kind, separator, address = value.partition(";")
    if not separator:
        kind, address = "rfc822", value
    if not _ADDR_TYPE.fullmatch(kind):
        kind = "rfc822"
    if address.isascii():
        return f"{kind};{xtext(address)}"
    return "utf-8;" + "".join(c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in address)


def _doing(what: str) -> str:
    if what == GREETING:
        return "receiving the initial server greeting"
    if what == END_OF_DATA:
        return "sending end of data -- message may be sent more than once"
    if what == BDAT:
        return "sending BDAT LAST -- message may be sent more than once"
    return f"sending {what}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _mismatch(policy: TLSPolicy) -> str:
    """What a TLS report calls a certificate the policy's checks refused after the handshake: no
    TLSA record matched (DANE), other names (the named levels) or other digests (fingerprint)."""
    if policy.tlsa:
        return TLSA_INVALID
    return CERTIFICATE_HOST_MISMATCH if policy.level in NAMED_LEVELS else CERTIFICATE_NOT_TRUSTED


def _tls_reason(exc: BaseException) -> str:
    """Why a handshake failed, from where we stand: OpenSSL words the server hanging up from its
    own side ("TLS/SSL connection has been closed (EOF)", UNEXPECTED_EOF_WHILE_READING), which
    reads as if we had closed the connection, and its other reasons as constant names."""
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "connection closed by the server"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return _reason(exc)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
