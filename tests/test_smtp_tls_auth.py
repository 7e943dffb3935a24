"""STARTTLS, SMTP AUTH, relay host naming, config checks and kept connections, through the real
daemon: aiosmtpd servers with certificates from a test CA, a real DNS server, loopback only."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from router.spool import Spool
from router.spool.queue_file import PENDING, parse
from tests.daemon import DAEMON_USER, qrouter, reachable, wait_for
from tests.dns_server import DNSServer
from tests.smtp_servers import SERVER_NAME, AioServer, Peer, Recorder, ScriptedServer

ME = "relay.qrouter.test"
MX = "mx.qrouter.test"
FAST = ["--smtp-timeouts", "connect=2,greeting=3,helo=3,starttls=3,auth=3,mail=3,rcpt=3,data=3,block=3,dot=3",
        "--min-backoff", "60", "--me", ME]
ZONE = """
mx.qrouter.test. 60 IN A 127.0.0.2
smarthost.qrouter.test. 60 IN MX 10 mx.qrouter.test.
smarthost.qrouter.test. 60 IN A 127.0.0.3
"""


class Sink(Recorder):
    """A Recorder that also notes, at each MAIL, the TLS version and the SASL login of the
    session (None when there is none), the TLS handshakes, and when DATA and QUIT arrived."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sessions: list[tuple[str | None, str | None]] = []
        self.handshakes = 0
        self.times: list[tuple[str, float]] = []
        self.drop_at_rset = False  # hang up when a RSET comes, as a server whose idle timer just fired

    def handle_STARTTLS(self, server, session, envelope) -> bool:
        self.handshakes += 1
        return True

    async def handle_MAIL(self, server, session, envelope, address, options):
        tls = session.ssl["ssl_object"].version() if session.ssl else None
        login = session.auth_data.login.decode() if session.authenticated else None
        self.sessions.append((tls, login))
        return await super().handle_MAIL(server, session, envelope, address, options)

    async def handle_DATA(self, server, session, envelope):
        self.times.append(("DATA", time.monotonic()))
        return await super().handle_DATA(server, session, envelope)

    async def handle_RSET(self, server, session, envelope):
        if self.drop_at_rset:
            self.drop_at_rset = False
            server.transport.close()
        return await super().handle_RSET(server, session, envelope)

    async def handle_QUIT(self, server, session, envelope):
        self.times.append(("QUIT", time.monotonic()))
        return await super().handle_QUIT(server, session, envelope)


class Accounts:
    """An aiosmtpd authenticator with one account, remembering every attempt."""

    def __init__(self, login: str = "user", password: str = "pass word") -> None:
        self.account = (login.encode(), password.encode())
        self.attempts: list[tuple[str, bytes, bytes]] = []

    def __call__(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        self.attempts.append((mechanism, auth_data.login, auth_data.password))
        return AuthResult(success=(auth_data.login, auth_data.password) == self.account, handled=False,
                          auth_data=auth_data)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The CA file the daemon trusts, and server contexts: a certificate for mx.qrouter.test,
    one for another name from the same CA, one for mx.qrouter.test from a CA nobody trusts, and
    one with no certificate at all, whose every handshake fails."""
    ca, stranger = trustme.CA(), trustme.CA()
    contexts = {}
    for name, issuer, host in (("good", ca, MX), ("wrong-name", ca, "other.qrouter.test"),
                               ("unknown-ca", stranger, MX)):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        issuer.issue_cert(host).configure_cert(context)
        contexts[name] = context
    contexts["broken"] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca_file = reachable(tmp_path_factory.mktemp("pki")) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return contexts, str(ca_file)


def enqueue(daemon, recipients=("a@example.org",), body=b"Subject: t\r\n\r\nbody\r\n") -> str:
    return Spool(daemon.spool).enqueue("s@example.org", list(recipients), body)


def delivered(daemon, queue_id: str) -> str:
    """Wait until the message is gone from the queue; its one log line per recipient."""
    wait_for(lambda: f"{queue_id}: removed" in daemon.log() or (daemon.spool / "deferred" / queue_id).exists(),
             what=f"the first attempt at {queue_id}")
    lines = [line for line in daemon.log().splitlines() if f"{queue_id}: to=<" in line]
    assert f"{queue_id}: removed" in daemon.log(), "\n".join(lines)
    return "\n".join(lines)


def deferred(daemon, queue_id: str):
    """Wait until the message is in deferred/; its stored recipients."""
    path = daemon.spool / "deferred" / queue_id
    wait_for(path.exists, what=f"{queue_id} in deferred/")
    return parse(path.read_bytes(), str(path)).recipients


def relay_auth_file(tmp_path: Path, text: str, mode: int = 0o600, owner: str = DAEMON_USER) -> Path:
    """The credentials file, the daemon user's as docs/deployment.md says: it reads it again at
    every reload."""
    path = tmp_path / "relay-auth"
    path.write_text(text)
    path.chmod(mode)
    shutil.chown(path, owner)
    return path


# -- STARTTLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["default", "may", "none"])
def test_starttls_is_used_when_offered_unless_the_policy_is_none(daemons, pki, policy):
    contexts, _ = pki
    flags = [] if policy == "default" else ["--smtp-tls", policy]
    with AioServer(Sink(), tls_context=contexts["good"]) as server:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{server.port}", *flags, *FAST, maildir=False)
        line = delivered(daemon, enqueue(daemon))
    sink = server.handler
    assert "status=sent (250 2.0.0 queued as 4711)" in line
    if policy == "none":
        assert sink.handshakes == 0 and sink.sessions == [(None, None)]
        assert sink.hellos == [ME]
    else:
        assert sink.handshakes == 1 and sink.sessions[0][0].startswith("TLSv1.")
        assert sink.hellos == [ME, ME]  # EHLO again inside TLS
    assert "takes precedence" not in daemon.log()


def test_may_sends_in_plain_text_at_once_when_the_tls_handshake_fails(daemons, pki):
    contexts, _ = pki
    with AioServer(Sink(), tls_context=contexts["broken"]) as server:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{server.port}", *FAST, maildir=False)
        queue_id = enqueue(daemon)
        line = delivered(daemon, queue_id)
    assert "status=sent (" in line and line.endswith(", attempts=1")
    assert server.handler.sessions == [(None, None)] and len(server.handler.messages) == 1
    [warning] = [ln for ln in daemon.log().splitlines() if "TLS" in ln and queue_id in ln]
    assert f"{queue_id}: TLS handshake with 127.0.0.1[127.0.0.1]:{server.port} failed: " in warning
    assert warning.endswith("; retrying without TLS") and warning.count("fail") == 1


def test_a_server_that_hangs_up_in_the_tls_handshake_gets_the_message_in_plain_text(daemons):
    wires: list[bytes] = []

    def hangs_up_in_the_handshake(peer: Peer) -> None:
        peer.greet("STARTTLS")
        peer.expect("STARTTLS")
        peer.send("220 2.0.0 ready to start TLS")
        peer.sock.recv(65536)  # the client hello, never answered
        peer.sock.shutdown(socket.SHUT_RDWR)

    def plain(peer: Peer) -> None:
        peer.greet("STARTTLS")
        for command in ("MAIL FROM:", "RCPT TO:"):
            peer.expect(command)
            peer.send("250 2.0.0 ok")
        peer.expect("DATA")
        peer.send("354 go ahead")
        wires.append(peer.data())
        peer.send("250 2.0.0 queued as 4711")

    with ScriptedServer(hangs_up_in_the_handshake, plain) as server:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{server.port}", *FAST, maildir=False)
        queue_id = enqueue(daemon)
        line = delivered(daemon, queue_id)
    assert line.endswith("status=sent (250 2.0.0 queued as 4711), attempts=1")
    assert wires == [b"Subject: t\r\n\r\nbody\r\n.\r\n"] and server.peers[1].lines[0].startswith("EHLO")
    assert "STARTTLS" not in server.peers[1].lines  # the retry is plain from the start
    [warning] = [ln for ln in daemon.log().splitlines() if "TLS" in ln and queue_id in ln]
    assert warning.endswith(f"{queue_id}: TLS handshake with 127.0.0.1[127.0.0.1]:{server.port} failed: "
                            "connection closed by the server; retrying without TLS")


@pytest.mark.parametrize("relayhost", ["[mx.qrouter.test]", "mx.qrouter.test"])
def test_encrypt_delivers_to_a_certificate_for_the_next_hop_name(daemons, pki, relayhost):
    contexts, ca_file = pki
    with AioServer(Sink(), host="127.0.0.2", tls_context=contexts["good"]) as server, DNSServer(ZONE) as dns:
        daemon = daemons("--relayhost", f"{relayhost}:{server.port}", "--smtp-tls", "encrypt",
                         "--smtp-tls-ca", ca_file, "--dns-servers", dns.servers, *FAST, maildir=False)
        line = delivered(daemon, enqueue(daemon))
    assert f"relay=mx.qrouter.test[127.0.0.2]:{server.port}," in line and "status=sent" in line
    assert server.handler.sessions[0][0].startswith("TLSv1.")
    asked = {(q.name, q.rdtype) for q in dns.queries}
    # a bare name is looked up as MX first (none here, so its A record serves); [name] never is
    assert (("mx.qrouter.test", "MX") in asked) == (not relayhost.startswith("["))
    assert ("mx.qrouter.test", "A") in asked


@pytest.mark.parametrize(("case", "dsn", "reason"), [
    ("no-starttls", "4.7.4", "TLS is required, but was not offered by host mx.qrouter.test[127.0.0.2]"),
    ("wrong-name", "4.7.5", "not verified for mx.qrouter.test"),
    ("unknown-ca", "4.7.5", "not verified for mx.qrouter.test"),
])
def test_encrypt_defers_without_a_verified_tls_session_and_sends_nothing(daemons, pki, case, dsn, reason):
    contexts, ca_file = pki
    context = None if case == "no-starttls" else contexts[case]
    with AioServer(Sink(), host="127.0.0.2", tls_context=context) as server, DNSServer(ZONE) as dns:
        daemon = daemons("--relayhost", f"[mx.qrouter.test]:{server.port}", "--smtp-tls", "encrypt",
                         "--smtp-tls-ca", ca_file, "--dns-servers", dns.servers, *FAST, maildir=False)
        [rcpt] = deferred(daemon, enqueue(daemon))
    assert (rcpt.state, rcpt.dsn) == (PENDING, dsn)
    assert reason in rcpt.reply
    assert server.handler.sessions == [] and server.handler.messages == []
    assert not any(c.startswith(("MAIL", "RCPT", "DATA")) for c in server.handler.commands)
    assert f"dsn={dsn}, status=deferred" in daemon.log()


# -- AUTH ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_relay_auth_logs_in_over_tls_and_delivers(daemons, pki, tmp_path, mechanism):
    contexts, _ = pki
    accounts = Accounts()
    other = [m for m in ("PLAIN", "LOGIN") if m != mechanism]
    credentials = relay_auth_file(tmp_path, "# relay credentials\nsmtp.example.org someone else\n"
                                            "127.0.0.1 user pass word\n")
    with AioServer(Sink(), tls_context=contexts["good"], authenticator=accounts, auth_required=True,
                   auth_exclude_mechanism=other) as server:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{server.port}", "--relay-auth", str(credentials),
                         *FAST, maildir=False)
        line = delivered(daemon, enqueue(daemon))
    assert "status=sent" in line
    assert accounts.attempts == [(mechanism, b"user", b"pass word")]
    [(tls, login)] = server.handler.sessions
    assert tls.startswith("TLSv1.") and login == "user"


def test_a_wrong_password_defers_and_never_bounces(daemons, pki, tmp_path):
    contexts, _ = pki
    accounts = Accounts()
    credentials = relay_auth_file(tmp_path, "127.0.0.1 user wrong\n")
    with AioServer(Sink(), tls_context=contexts["good"], authenticator=accounts, auth_required=True) as server:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{server.port}", "--relay-auth", str(credentials),
                         *FAST, maildir=False)
        [rcpt] = deferred(daemon, enqueue(daemon))
    assert (rcpt.state, rcpt.dsn) == (PENDING, "4.7.8")
    assert rcpt.reply.startswith("SASL authentication failed; ") and "535 5.7.8" in rcpt.reply
    assert accounts.attempts == [("PLAIN", b"user", b"wrong")]
    assert server.handler.messages == [] and "status=bounced" not in daemon.log()


def test_a_relay_auth_file_the_daemon_user_cannot_read_is_found_before_the_first_reload(tmp_path):
    """Read as root at the start, it passed; the first reload, as the daemon's user, failed.
    Now check-config and the start both say so, naming the file, its owner and the user."""
    credentials = relay_auth_file(tmp_path, "127.0.0.1 user secret\n", owner="root")
    spool = tmp_path / "spool"
    problem = (f"relay-auth {credentials}: user {DAEMON_USER} cannot read it (root:root 600), and reads it "
               "again at every reload: give it to that user or to a group of it")
    checked = qrouter("check-config", "--queue-dir", str(spool), "--relay-auth", str(credentials))
    assert checked.returncode == 78 and f"qrouter: {problem}\n" in checked.stderr.decode(), checked
    started = qrouter("run", "--foreground", "--queue-dir", str(spool), "--relay-auth", str(credentials))
    assert started.returncode == 1 and f"fatal: cannot start: {problem}" in started.stderr.decode(), started
    assert "secret" not in checked.stderr.decode() + started.stderr.decode()


def test_a_relay_auth_file_others_may_read_stops_the_daemon_from_starting(tmp_path):
    credentials = relay_auth_file(tmp_path, "127.0.0.1 user secret\n", mode=0o640)
    spool = tmp_path / "spool"
    result = qrouter("run", "--foreground", "--queue-dir", str(spool), "--relay-auth", str(credentials))
    error = result.stderr.decode()
    assert result.returncode == 78, error
    assert f"--relay-auth: relay-auth: {credentials}: readable by group or others (mode 0640)" in error
    assert "secret" not in error and not spool.exists()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("plaintext_auth", ["no", "yes"])
def test_credentials_go_over_plain_text_only_when_allowed(daemons, tmp_path, plaintext_auth):
    accounts = Accounts()
    credentials = relay_auth_file(tmp_path, "127.0.0.1 user pass word\n")
    with AioServer(Sink(), authenticator=accounts, auth_require_tls=False, auth_required=True) as server:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{server.port}", "--relay-auth", str(credentials),
                         "--smtp-plaintext-auth", plaintext_auth, *FAST, maildir=False)
        queue_id = enqueue(daemon)
        if plaintext_auth == "yes":
            assert "status=sent" in delivered(daemon, queue_id)
        else:
            [rcpt] = deferred(daemon, queue_id)
    if plaintext_auth == "yes":
        assert accounts.attempts == [("PLAIN", b"user", b"pass word")]
        assert server.handler.sessions == [(None, "user")]
    else:
        assert (rcpt.state, rcpt.dsn) == (PENDING, "4.7.0")
        assert "not sending credentials" in rcpt.reply and "over an unencrypted connection" in rcpt.reply
        assert accounts.attempts == [] and server.handler.messages == []


# -- configuration and naming --------------------------------------------------------------------


@pytest.mark.parametrize(("relayhost", "host", "ip"), [("smarthost", "mx.qrouter.test", "127.0.0.2"),
                                                       ("[smarthost]", "smarthost.qrouter.test", "127.0.0.3")])
def test_a_short_relayhost_is_qualified_under_the_domain_of_me(daemons, relayhost, host, ip):
    with AioServer(Sink(), host=ip) as server, DNSServer(ZONE) as dns:
        daemon = daemons("--relayhost", f"{relayhost}:{server.port}", "--dns-servers", dns.servers, *FAST,
                         maildir=False)
        line = delivered(daemon, enqueue(daemon))
    assert f"relay={host}[{ip}]:{server.port}," in line and "status=sent" in line
    asked = [(q.name, q.rdtype) for q in dns.queries]
    assert (("smarthost.qrouter.test", "MX") in asked) == (relayhost == "smarthost")  # [name] skips MX
    assert not any(name == "smarthost" for name, _ in asked)


def test_localhost_as_relayhost_is_not_qualified(daemons):
    with AioServer(Sink()) as server, DNSServer("@ 60 IN A 127.0.0.1\n", origin="localhost.") as dns:
        daemon = daemons("--relayhost", f"[localhost]:{server.port}", "--dns-servers", dns.servers, *FAST,
                         maildir=False)
        line = delivered(daemon, enqueue(daemon))
    assert f"relay=localhost[127.0.0.1]:{server.port}," in line and "status=sent" in line
    assert {q.name for q in dns.queries} == {"localhost"}


def test_relayhost_takes_precedence_over_default_transport(daemons):
    with AioServer(Sink()) as server:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{server.port}", *FAST)  # with a maildir default-transport
        line = delivered(daemon, enqueue(daemon))
    warning = next(ln for ln in daemon.log().splitlines() if "takes precedence" in ln)
    assert f"relayhost [127.0.0.1]:{server.port} takes precedence" in warning and "default-transport" in warning
    assert daemon.log().index("takes precedence") < daemon.log().index("started:")
    assert "status=sent" in line and len(server.handler.messages) == 1
    assert daemon.delivered() == []


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--smtp-timeouts", "bogus=3", "must name steps among "),
    ("--smtp-timeouts", "connect=0", "must give each step more than 0 seconds"),
    ("--smtp-tls-ca", "/nonexistent/ca.pem", "must be an existing file"),
    ("--smtp-tls", "sometimes", "must be one of none, may, encrypt"),
    ("--smtp-port", "0", "must be a port number from 1 to 65535"),
    ("--dns-servers", "127.0.0.1:99999", "port '99999' must be a number from 1 to 65535"),
])
def test_bad_values_stop_the_daemon_naming_the_flag(tmp_path, flag, value, says):
    spool = tmp_path / "spool"
    result = qrouter("run", "--foreground", "--queue-dir", str(spool), flag, value)
    error = result.stderr.decode()
    assert result.returncode == 78, error
    assert error.startswith(f"qrouter: {flag}: ") and says in error and value.split("=")[0] in error
    assert "Traceback" not in error and not spool.exists()


# -- kept connections ----------------------------------------------------------------------------


def test_one_connection_carries_both_messages_until_the_idle_timeout(daemons):
    with AioServer(Sink()) as server:
        # 6 s: the next message comes well within it, however slow this process is
        daemon = daemons("--relayhost", f"[127.0.0.1]:{server.port}", "--smtp-idle-timeout", "6", *FAST,
                         workers=1, maildir=False)
        first = enqueue(daemon, ["a@example.org"])
        delivered(daemon, first)
        second = enqueue(daemon, ["b@example.org"])
        delivered(daemon, second)
        assert "QUIT" not in server.handler.commands  # still kept for the next message
        wait_for(lambda: "QUIT" in server.handler.commands, timeout=20, what="QUIT after the idle timeout")
    sink = server.handler
    assert sink.hellos == [ME]
    assert sink.commands == ["MAIL s@example.org", "RCPT a@example.org", "DATA", "RSET",
                             "MAIL s@example.org", "RCPT b@example.org", "DATA", "QUIT"]
    times = dict(sink.times[1:])  # the second DATA and the QUIT
    assert times["QUIT"] - times["DATA"] >= 5.9


@pytest.mark.parametrize("how", ["server timeout over TLS", "server restart", "server hangs up at RSET"])
def test_a_kept_connection_the_server_closed_is_replaced_without_a_failed_attempt(daemons, pki, how, caplog):
    contexts, _ = pki
    restart = how == "server restart"
    # 3 s: no step of the sessions waits that long, however slow this process is
    options = {"tls_context": contexts["good"], "timeout": 3} if "timeout" in how else {}
    caplog.set_level(logging.INFO, logger="mail.log")  # aiosmtpd's
    with AioServer(Sink(), **options) as server:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{server.port}", "--smtp-idle-timeout", "30", *FAST,
                         workers=1, maildir=False)
        delivered(daemon, enqueue(daemon, ["a@example.org"]))
        if restart:  # stopping closes the kept connection; then a server on the same port again
            server.controller.stop()
            server.controller = Controller(server.handler, hostname="127.0.0.1", port=server.port,
                                           server_hostname=SERVER_NAME)
            server.controller.start()
        elif how == "server hangs up at RSET":  # seen only when the next message is under way
            server.handler.drop_at_rset = True
        else:  # the server drops the idle connection after its timeout
            wait_for(lambda: "connection timeout" in caplog.text, 20, "the server's timeout")
        line = delivered(daemon, enqueue(daemon, ["b@example.org"]))
    sink = server.handler
    assert "status=sent (" in line and line.endswith(", attempts=1")
    assert [m.rcpt_tos for m in sink.messages] == [["a@example.org"], ["b@example.org"]]
    assert sink.hellos == [ME] * (4 if "TLS" in how else 2)  # a second session (under TLS, EHLO twice each)
    assert ("RSET" in sink.commands) == ("RSET" in how)
    assert "status=deferred" not in daemon.log()
