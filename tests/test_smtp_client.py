"""The SMTP/LMTP client against real servers on loopback: aiosmtpd for what a sound server
does, and scripted raw-socket servers for the hostile, the broken and the byte-exact."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import tempfile
import time

import pytest
import trustme
from aiosmtpd.smtp import AuthResult
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.tls_policy import TLS_ENCRYPT, TLS_MAY, TLS_NONE
from router.config.timeouts import Timeouts
from router.spool.queue_file import Recipient
from tests.daemon import wait_for
from tests.smtp_servers import SERVER_NAME, AioServer, Peer, Recorder, ScriptedServer, free_port
from workers.smtp_client import SMTPClient, SMTPError, TLSFallback
from workers.smtp_wire import wire_data, wrap_long_lines
from workers.transport import BOUNCED, DEFERRED, SENT

HELO = "client.example.net"
QUICK = Timeouts.uniform(10)  # never waited out: a bound of 5 s shows a test did not wait
SHORT = 0.4  # the one timeout a hostile-server test waits out


def connect(server: AioServer | ScriptedServer, **kwargs) -> SMTPClient:
    kwargs.setdefault("timeouts", QUICK)
    kwargs.setdefault("tls", TLS_NONE)
    return SMTPClient.connect(server.host, server.port, helo_name=HELO, **kwargs)


def patient_except(**timeouts: float) -> Timeouts:
    """Long timeouts except those named: a test then shows which timeout fired."""
    return Timeouts(**{**{name: 10.0 for name in Timeouts.__dataclass_fields__}, **timeouts})


def crlf(message: bytes) -> bytes:
    """What a server should store: each LF or CRLF line end as CRLF, a last line ended."""
    lines = message.split(b"\n")
    tail = lines.pop()
    body = b"".join((line[:-1] if line.endswith(b"\r") else line) + b"\r\n" for line in lines)
    return body + (tail + b"\r\n" if tail else b"")


def outcomes(replies) -> list[tuple[str, str]]:
    return [(r.status, r.dsn) for r in replies]


def accept_envelope(peer: Peer, *extensions: str, rcpts: int = 1, verb: str = "EHLO") -> None:
    """Greet, accept MAIL and `rcpts` RCPTs, and read the DATA command."""
    peer.greet(*extensions, verb=verb)
    peer.expect("MAIL FROM:")
    peer.send("250 2.1.0 ok")
    for _ in range(rcpts):
        peer.expect("RCPT TO:")
        peer.send("250 2.1.5 ok")
    peer.expect("DATA")


def quit_or_hang_up(peer: Peer) -> None:
    try:
        peer.expect("QUIT")
        peer.send("221 2.0.0 bye")
    except EOFError:
        pass


# -- a sound server ------------------------------------------------------------------------------


def test_delivers_and_knows_the_peer_as_host_ip_port():
    with AioServer(host="127.0.0.2") as server:
        client = SMTPClient.connect(SERVER_NAME, server.port, ip="127.0.0.2", helo_name=HELO, timeouts=QUICK,
                                    tls=TLS_NONE)
        assert client.peer == f"{SERVER_NAME}[127.0.0.2]:{server.port}"
        replies = client.send("sender@example.org", ["a@example.org", "b@example.org"], b"Subject: hi\n\nhello\n")
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0")] * 2
    assert str(replies[0]) == "250 2.0.0 queued as 4711"
    assert replies[0].describe(client.peer) == (f"host {client.peer} said: 250 2.0.0 queued as 4711 "
                                                "(in reply to end of DATA command)")
    [message] = server.handler.messages
    assert (message.mail_from, message.rcpt_tos) == ("sender@example.org", ["a@example.org", "b@example.org"])
    assert message.content == b"Subject: hi\r\n\r\nhello\r\n"
    assert server.handler.hellos == [HELO]


def test_peer_ip_comes_from_the_socket_when_not_given():
    with AioServer() as server:
        client = SMTPClient.connect("localhost", server.port, helo_name=HELO, timeouts=QUICK, tls=TLS_NONE)
        client.close()
    assert client.peer == f"localhost[127.0.0.1]:{server.port}"


def test_connects_from_the_bind_address():
    seen = []

    def note_client(peer: Peer) -> None:
        seen.append(peer.sock.getpeername()[0])
        peer.greet()
        quit_or_hang_up(peer)

    with ScriptedServer(note_client) as server:
        connect(server, bind="127.0.0.3").close()
    assert seen == ["127.0.0.3"]


def test_ehlo_extensions_are_parsed():
    handler = Recorder(extensions=["PIPELINING", "DSN", "ENHANCEDSTATUSCODES", "AUTH=LOGIN"])
    with AioServer(handler, data_size_limit=12345, enable_SMTPUTF8=True, auth_require_tls=False) as server:
        client = connect(server)
        client.close()
    assert client.esmtp and client.pipelining
    assert client.size_limit == 12345
    assert {"8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"} <= set(client.extensions)
    assert client.auth_mechanisms == {"PLAIN", "LOGIN"}


def test_helo_when_ehlo_is_refused_and_then_no_extensions_are_used():
    def old_server(peer: Peer) -> None:
        peer.send("220 old.example.test SMTP")
        peer.expect("EHLO")
        peer.send("502 5.5.1 command not recognized")
        assert peer.expect("HELO") == f"HELO {HELO}"
        peer.send("250 old.example.test")
        assert peer.line() == "MAIL FROM:<sender@example.org>"
        peer.send("250 ok")
        assert peer.line() == "RCPT TO:<a@example.org>"
        peer.send("250 ok")
        peer.expect("DATA")
        peer.send("354 go ahead")
        assert peer.data() == "gr\u00fc\u00dfe\r\n.\r\n".encode()
        peer.send("250 ok")
        quit_or_hang_up(peer)

    with ScriptedServer(old_server) as server:
        client = connect(server)
        replies = client.send("sender@example.org", [Recipient("a@example.org", notify="SUCCESS")],
                              "gr\u00fc\u00dfe\n".encode(), ret="FULL", envid="x")
        client.close()
    assert not client.esmtp and client.extensions == {}
    assert outcomes(replies) == [(SENT, "2.0.0")]


# -- recipients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_each_recipient_gets_its_own_answer(pipelining):
    handler = Recorder(rcpt={"gone@example.org": "550 5.1.1 <gone@example.org>: no such user"},
                       extensions=["PIPELINING"] if pipelining else [])
    with AioServer(handler) as server:
        client = connect(server)
        assert client.pipelining == pipelining
        replies = client.send("s@example.org", ["a@example.org", "gone@example.org", "b@example.org"], b"x\n")
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0"), (BOUNCED, "5.1.1"), (SENT, "2.0.0")]
    assert replies[1].describe(client.peer) == (f"host {client.peer} said: 550 5.1.1 <gone@example.org>: "
                                                "no such user (in reply to RCPT TO command)")
    assert [m.rcpt_tos for m in handler.messages] == [["a@example.org", "b@example.org"]]


def test_pipelining_sends_mail_and_every_rcpt_in_one_write():
    def pipelining_server(peer: Peer) -> None:
        peer.greet("PIPELINING")
        # Nothing is answered until all four commands are in: a client waiting for the MAIL
        # reply before its RCPTs would time out here.
        envelope = [peer.line() for _ in range(4)]
        assert envelope == ["MAIL FROM:<s@example.org>", "RCPT TO:<a@example.org>",
                            "RCPT TO:<b@example.org>", "RCPT TO:<c@example.org>"]
        peer.send("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 unknown user", "250 2.1.5 ok")
        peer.expect("DATA")
        peer.send("354 go ahead")
        peer.data()
        peer.send("250 2.0.0 done")
        quit_or_hang_up(peer)

    with ScriptedServer(pipelining_server) as server:
        # 3 s: room for a stall of this process; a client waiting for the MAIL reply still times out
        client = connect(server, timeouts=patient_except(mail=3, rcpt=3))
        replies = client.send("s@example.org", ["a@example.org", "b@example.org", "c@example.org"], b"x\n")
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0"), (BOUNCED, "5.1.1"), (SENT, "2.0.0")]


def test_without_pipelining_each_command_waits_for_its_reply():
    def lockstep_server(peer: Peer) -> None:
        peer.greet()
        peer.expect("MAIL FROM:")
        time.sleep(0.3)
        peer.sock.setblocking(False)
        try:
            early = peer.sock.recv(100)
        except BlockingIOError:
            early = b""
        peer.sock.setblocking(True)
        peer.sock.settimeout(10)
        assert early == b"" and peer.buffer == b"", "RCPT sent before the MAIL reply"
        peer.send("250 ok")
        peer.expect("RCPT TO:<a@example.org>")
        peer.send("250 ok")
        peer.expect("RCPT TO:<b@example.org>")
        peer.send("250 ok")
        peer.expect("DATA")
        peer.send("354 go ahead")
        peer.data()
        peer.send("250 ok")
        quit_or_hang_up(peer)

    with ScriptedServer(lockstep_server) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org", "b@example.org"], b"x\n")
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0")] * 2


def test_a_refused_sender_answers_every_recipient_and_no_data_is_sent():
    def picky_server(peer: Peer) -> None:
        peer.greet("PIPELINING")
        peer.expect("MAIL FROM:")
        peer.expect("RCPT TO:")
        peer.expect("RCPT TO:")
        peer.expect("DATA")  # pipelined with the envelope (RFC 2920); refused, so no data follows
        peer.send("553 5.1.8 sender domain does not exist", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL",
                  "503 5.5.1 need RCPT")
        peer.expect("QUIT")
        peer.send("221 bye")

    with ScriptedServer(picky_server) as server:
        client = connect(server)
        replies = client.send("s@nowhere.example", ["a@example.org", "b@example.org"], b"x\n")
        client.close()
    assert outcomes(replies) == [(BOUNCED, "5.1.8")] * 2
    assert replies[0].text == "sender domain does not exist" and replies[0].command == "MAIL FROM"


def test_refused_data_answers_the_accepted_recipients_only():
    handler = Recorder(rcpt={"gone@example.org": "550 5.1.1 no such user"},
                       data="554 5.7.1 message refused as spam")
    with AioServer(handler) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org", "gone@example.org"], b"buy now\n")
        client.close()
    assert outcomes(replies) == [(BOUNCED, "5.7.1"), (BOUNCED, "5.1.1")]
    assert replies[0].text == "message refused as spam"


@pytest.mark.parametrize("pipelining", [True, False])
def test_too_many_recipients_leaves_the_rest_for_a_new_transaction(pipelining):
    handler = Recorder(max_rcpt=2, extensions=["PIPELINING"] if pipelining else [])
    everyone = [f"u{i}@example.org" for i in range(5)]
    with AioServer(handler) as server:
        client = connect(server)
        first = client.send("s@example.org", everyone, b"x\n")
        assert outcomes(first) == [(SENT, "2.0.0")] * 2 + [(DEFERRED, "4.5.3")] * 3
        assert [r.unsent for r in first] == [False, False, True, True, True]
        left = [a for a, r in zip(everyone, first, strict=True) if r.unsent]
        second = client.send("s@example.org", left, b"x\n")
        assert [r.unsent for r in second] == [False, False, True]
        third = client.send("s@example.org", left[2:], b"x\n")
        client.close()
    assert outcomes(third) == [(SENT, "2.0.0")]
    assert [m.rcpt_tos for m in handler.messages] == [everyone[:2], everyone[2:4], everyone[4:]]
    first_rcpts = handler.commands[:handler.commands.index("DATA")]
    # Without pipelining the client stops at the first 452; with it all were already sent.
    assert len(first_rcpts) == 1 + (5 if pipelining else 3)
    assert handler.commands.count("RSET") == 2


def test_other_452s_are_ordinary_deferrals():
    handler = Recorder(rcpt={"full@example.org": "452 4.2.2 mailbox full",
                             "first@example.org": "452 4.3.1 insufficient system storage"})
    with AioServer(handler) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["first@example.org", "a@example.org", "full@example.org",
                                                "b@example.org"], b"x\n")
        client.close()
    assert outcomes(replies) == [(DEFERRED, "4.3.1"), (SENT, "2.0.0"), (DEFERRED, "4.2.2"), (SENT, "2.0.0")]
    assert not any(r.unsent for r in replies)
    assert handler.messages[0].rcpt_tos == ["a@example.org", "b@example.org"]


# -- SIZE, SMTPUTF8, 8BITMIME, DSN ---------------------------------------------------------------


def test_message_over_the_size_limit_fails_permanently_without_being_sent():
    with AioServer(data_size_limit=1000) as server:
        client = connect(server)
        too_big = client.send("s@example.org", ["a@example.org", "b@example.org"],
                              b"x" * 499 + b"\n" + b"y" * 498 + b"\n")
        fits = client.send("s@example.org", ["a@example.org"], b"a\nb\n")
        client.close()
    assert outcomes(too_big) == [(BOUNCED, "5.3.4")] * 2
    assert too_big[0].local
    assert too_big[0].describe(client.peer) == f"message size 1001 exceeds size limit 1000 of server {client.peer}"
    assert outcomes(fits) == [(SENT, "2.0.0")]
    [message] = server.handler.messages
    assert "SIZE=6" in message.mail_options  # the size with CRLF line ends
    assert [c for c in server.handler.commands if c.startswith("MAIL")] == ["MAIL s@example.org"]


def test_international_address_without_smtputf8_fails_permanently():
    with AioServer(enable_SMTPUTF8=False) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["plain@example.org", "j\u00f6rg@example.org"], b"x\n")
        from_international = client.send("j\u00f6rg@example.org", ["plain@example.org"], b"x\n")
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0"), (BOUNCED, "5.6.7")]
    assert replies[1].text == f"SMTPUTF8 is required, but was not offered by host {client.peer}"
    assert outcomes(from_international) == [(BOUNCED, "5.6.7")]
    assert [m.rcpt_tos for m in server.handler.messages] == [["plain@example.org"]]
    assert "SMTPUTF8" not in server.handler.messages[0].mail_options


def test_smtputf8_is_used_when_offered_and_needed():
    with AioServer(enable_SMTPUTF8=True) as server:
        client = connect(server)
        international = client.send("s@example.org", ["j\u00f6rg@example.org"], b"x\n")
        ascii_only = client.send("s@example.org", ["a@example.org"], b"Subject: plain\n\nx\n")
        utf8_header = client.send("s@example.org", ["a@example.org"], "Subject: gr\u00fc\u00dfe\n\nx\n".encode())
        client.close()
    assert outcomes(international + ascii_only + utf8_header) == [(SENT, "2.0.0")] * 3
    first, second, third = server.handler.messages
    assert first.rcpt_tos == ["j\u00f6rg@example.org"] and "SMTPUTF8" in first.mail_options
    assert "SMTPUTF8" not in second.mail_options
    assert "SMTPUTF8" in third.mail_options


def test_8bitmime_is_declared_only_when_offered_and_needed():
    eight_bit = "Gr\u00fc\u00dfe\n".encode()
    with AioServer() as offering:
        client = connect(offering)
        client.send("s@example.org", ["a@example.org"], eight_bit)
        client.send("s@example.org", ["a@example.org"], b"plain\n")
        client.close()
    with AioServer(Recorder(without=["8BITMIME"])) as silent:
        client = connect(silent)
        replies = client.send("s@example.org", ["a@example.org"], eight_bit)
        client.close()
    assert [("BODY=8BITMIME" in m.mail_options) for m in offering.handler.messages] == [True, False]
    assert outcomes(replies) == [(SENT, "2.0.0")]
    assert silent.handler.messages[0].mail_options == ["SIZE=9"]
    assert silent.handler.messages[0].content == "Gr\u00fc\u00dfe\r\n".encode()


def test_dsn_parameters_go_to_a_server_that_offers_dsn():
    def dsn_server(peer: Peer) -> None:
        peer.greet("PIPELINING", "DSN", "SIZE 100000")
        lines = [peer.line() for _ in range(4)]
        assert lines == [
            "MAIL FROM:<s@example.org> SIZE=3 RET=HDRS ENVID=Q1+2Bx+3Dy",
            "RCPT TO:<a@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Btag@example.org",
            "RCPT TO:<b@example.org>",
            "RCPT TO:<c@example.org> NOTIFY=NEVER ORCPT=utf-8;j\\x{F6}rg@example.org",
        ]
        peer.send("250 ok", "250 ok", "250 ok", "250 ok")
        peer.expect("DATA")
        peer.send("354 go ahead")
        peer.data()
        peer.send("250 ok")
        quit_or_hang_up(peer)

    rcpts = [Recipient("a@example.org", notify="success,failure", orcpt="rfc822;a+tag@example.org"),
             "b@example.org",
             Recipient("c@example.org", notify="NEVER", orcpt="rfc822;j\u00f6rg@example.org")]
    with ScriptedServer(dsn_server) as server:
        client = connect(server)
        replies = client.send("s@example.org", rcpts, b"x\n", ret="hdrs", envid="Q1+x=y")
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0")] * 3


def test_no_dsn_parameters_to_a_server_without_dsn():
    # aiosmtpd answers 555 to any MAIL or RCPT parameter it does not know.
    with AioServer() as server:
        client = connect(server)
        replies = client.send("s@example.org", [Recipient("a@example.org", notify="SUCCESS", orcpt="rfc822;a@x")],
                              b"x\n", ret="FULL", envid="id1")
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0")]
    assert server.handler.messages[0].rcpt_options == [[]]


# -- the message on the wire ---------------------------------------------------------------------

WIRE = {
    "lf": (b"Subject: x\n\nhello\n", b"Subject: x\r\n\r\nhello\r\n.\r\n"),
    "crlf": (b"Subject: x\r\n\r\nhello\r\n", b"Subject: x\r\n\r\nhello\r\n.\r\n"),
    "mixed": (b"a\r\nb\nc\r\n\nd\n", b"a\r\nb\r\nc\r\n\r\nd\r\n.\r\n"),
    "no-final-newline": (b"a\nlast", b"a\r\nlast\r\n.\r\n"),
    "dots": (b".\n..\n.x\nx.\n", b"..\r\n...\r\n..x\r\nx.\r\n.\r\n"),
    "dot-first-crlf": (b".\r\nrest", b"..\r\nrest\r\n.\r\n"),
    "bare-cr-kept": (b"a\rb\r\r\nc\r", b"a\rb\r\r\nc\r\r\n.\r\n"),
    "smuggling-attempt": (b"a\n.\nb\r\n.\rc\n", b"a\r\n..\r\nb\r\n..\rc\r\n.\r\n"),
    "binary": (b"\x00\xff\xfe\n\x7f", b"\x00\xff\xfe\r\n\x7f\r\n.\r\n"),
    "empty": (b"", b".\r\n"),
}


@pytest.mark.parametrize("name", WIRE)
def test_the_server_receives_exactly_the_intended_bytes(name):
    message, expected = WIRE[name]
    seen = []

    def capturing_server(peer: Peer) -> None:
        accept_envelope(peer)
        peer.send("354 go ahead")
        seen.append(peer.data())
        peer.send("250 ok")
        quit_or_hang_up(peer)

    with ScriptedServer(capturing_server) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org"], message)
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0")]
    assert seen == [expected]


@pytest.mark.parametrize("name", WIRE)
def test_a_real_server_stores_the_message_with_crlf_line_ends(name):
    message, _ = WIRE[name]
    with AioServer() as server:
        client = connect(server)
        client.send("s@example.org", ["a@example.org"], message)
        client.close()
    assert server.handler.messages[0].content == crlf(message)


def test_any_bytes_survive_on_one_kept_connection():
    pieces = st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"a", b"\x00", b"\xff", b" "])
    messages = st.one_of(st.lists(pieces, max_size=80).map(b"".join), st.binary(max_size=600))
    with AioServer() as server:
        client = connect(server)

        @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(messages)
        def check(message: bytes) -> None:
            replies = client.send("s@example.org", ["a@example.org"], message)
            assert outcomes(replies) == [(SENT, "2.0.0")]
            assert server.handler.messages[-1].content == crlf(message)

        check()
        client.close()
    assert client.transactions == len(server.handler.messages) > 1


def test_a_large_binary_message_arrives_intact():
    message = bytes(range(256)) * 12_000  # 3 MB, a line end every 256 bytes
    with AioServer() as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org"], message)
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0")]
    assert server.handler.messages[0].content == crlf(message)


# -- LMTP ----------------------------------------------------------------------------------------


def test_lmtp_answers_each_accepted_recipient_after_the_dot():
    handler = Recorder(rcpt={"gone@example.org": "550 5.1.1 no such user"},
                       lmtp={"full@example.org": "452 4.2.2 mailbox full", "b@example.org": "250 2.0.0 b saved"})
    with AioServer(handler, lmtp=True) as server:
        client = connect(server, lmtp=True)
        assert client.pipelining  # LMTP servers must pipeline
        replies = client.send("s@example.org", ["a@example.org", "gone@example.org", "full@example.org",
                                                "b@example.org"], b"x\n")
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0"), (BOUNCED, "5.1.1"), (DEFERRED, "4.2.2"), (SENT, "2.0.0")]
    assert replies[3].text == "b saved" and replies[3].command == "end of DATA"
    assert handler.hellos == [HELO]  # by LHLO: aiosmtpd's LMTP refuses EHLO


def test_lmtp_over_a_unix_socket():
    directory = tempfile.mkdtemp(prefix="lmtp")  # short: a socket path has a length limit
    path = os.path.join(directory, "lmtp.sock")
    try:
        with AioServer(Recorder(lmtp={}), lmtp=True, unix_socket=path) as server:
            client = SMTPClient.connect_unix(path, helo_name=HELO, timeouts=QUICK)
            replies = client.send("s@example.org", ["a@example.org", "b@example.org"], b"x\n")
            client.close()
    finally:
        shutil.rmtree(directory)
    assert client.peer == f"unix[{path}]"
    assert outcomes(replies) == [(SENT, "2.0.0")] * 2
    assert server.handler.messages[0].rcpt_tos == ["a@example.org", "b@example.org"]


def test_lmtp_connection_lost_between_per_recipient_replies():
    def dying_lmtp(peer: Peer) -> None:
        accept_envelope(peer, verb="LHLO", rcpts=2)
        peer.send("354 go ahead")
        peer.data()
        peer.send("250 2.0.0 first saved")

    with ScriptedServer(dying_lmtp) as server:
        client = connect(server, lmtp=True)
        replies = client.send("s@example.org", ["a@example.org", "b@example.org"], b"x\n")
    assert outcomes(replies) == [(SENT, "2.0.0"), (DEFERRED, "4.4.2")]
    assert replies[1].text == (f"lost connection with {client.peer} while sending end of data -- "
                               "message may be sent more than once")
    assert not client.is_alive()


# -- replies -------------------------------------------------------------------------------------


def test_multiline_replies_are_joined_and_status_codes_parsed_or_derived():
    answers = {
        "multi@example.org": ["550-5.1.1 The account you tried to reach does not exist.",
                              "550-5.1.1 Please check the address",
                              "550 5.1.1 and try again."],
        "plain@example.org": ["550 mailbox unavailable"],
        "later@example.org": ["451 try again later"],
        "odd@example.org": ["550 4.1.1 mismatched class"],
        "ok@example.org": ["250 ok"],
    }

    def chatty_server(peer: Peer) -> None:
        peer.greet("PIPELINING")
        peer.expect("MAIL FROM:")
        replies = ["250 ok"]
        for _ in answers:
            replies += answers[peer.expect("RCPT TO:")[9:-1]]
        peer.send(*replies)
        peer.expect("DATA")
        peer.send("354 go ahead")
        peer.data()
        peer.send("250-queued", "250 as 1234")
        quit_or_hang_up(peer)

    with ScriptedServer(chatty_server) as server:
        client = connect(server)
        replies = client.send("s@example.org", list(answers), b"x\n")
        client.close()
    assert [(r.code, r.dsn, r.text) for r in replies] == [
        (550, "5.1.1", "The account you tried to reach does not exist. Please check the address and try again."),
        (550, "5.0.0", "mailbox unavailable"),
        (451, "4.0.0", "try again later"),
        (550, "5.0.0", "4.1.1 mismatched class"),
        (250, "2.0.0", "queued as 1234"),
    ]
    assert [r.status for r in replies] == [BOUNCED, BOUNCED, DEFERRED, BOUNCED, SENT]


# -- keeping a connection ------------------------------------------------------------------------


def test_rset_between_messages_and_quit_on_close():
    """Each transaction on a kept connection starts with RSET, whether the last one ended with
    its data or stopped before it (every recipient refused)."""
    with AioServer(Recorder(rcpt={"x@example.org": "550 5.1.1 no such user"})) as server:
        client = connect(server)
        client.send("s@example.org", ["a@example.org"], b"one\n")
        assert client.is_alive()
        client.send("s@example.org", ["b@example.org"], b"two\n")
        client.send("s@example.org", ["x@example.org"], b"refused\n")
        client.send("s@example.org", ["c@example.org"], b"three\n")  # resets by itself
        client.close()
        client.close()
        after = client.send("s@example.org", ["d@example.org"], b"four\n")
    assert server.handler.commands == [
        "MAIL s@example.org", "RCPT a@example.org", "DATA", "RSET",
        "MAIL s@example.org", "RCPT b@example.org", "DATA", "RSET",
        "MAIL s@example.org", "RCPT x@example.org", "RSET",
        "MAIL s@example.org", "RCPT c@example.org", "DATA", "QUIT",
    ]
    assert [m.rcpt_tos for m in server.handler.messages] == [["a@example.org"], ["b@example.org"], ["c@example.org"]]
    assert client.transactions == 4 and not client.is_alive()
    assert outcomes(after) == [(DEFERRED, "4.4.2")]
    assert after[0].text == f"connection with {client.peer} is closed"


def test_a_kept_connection_the_server_closed_is_noticed():
    with AioServer(timeout=1.0) as server:  # the server drops idle clients after 1 s
        client = connect(server)
        assert client.is_alive()
        wait_for(lambda: not client.is_alive(), timeout=10, what="the closed connection noticed")
        assert not client.is_open  # and closed on our side
        stale = connect(server)
        time.sleep(3.0)  # the server's timeout, and time for it to close
        replies = stale.send("s@example.org", ["a@example.org"], b"x\n")  # without asking first
    assert outcomes(replies) == [(DEFERRED, "4.4.2")]
    assert "while sending MAIL FROM" in replies[0].text
    assert not stale.is_alive()


# -- hostile servers -----------------------------------------------------------------------------


def test_a_server_that_never_greets_times_out():
    with ScriptedServer(lambda peer: peer.wait_closed()) as server:
        started = time.monotonic()
        with pytest.raises(SMTPError) as caught:
            connect(server, timeouts=patient_except(greeting=SHORT))
    assert time.monotonic() - started < 5
    reply = caught.value.reply
    assert (reply.status, reply.dsn, reply.local) == (DEFERRED, "4.4.2", True)
    assert reply.text == (f"conversation with 127.0.0.1[127.0.0.1]:{server.port} timed out while "
                          "receiving the initial server greeting")


def test_a_server_that_hangs_after_data_defers_everyone():
    def hang_after_data(peer: Peer) -> None:
        accept_envelope(peer, rcpts=2)
        peer.wait_closed()

    with ScriptedServer(hang_after_data) as server:
        client = connect(server, timeouts=patient_except(data=SHORT))
        started = time.monotonic()
        replies = client.send("s@example.org", ["a@example.org", "b@example.org"], b"x\n")
        elapsed = time.monotonic() - started
    assert elapsed < 5
    assert outcomes(replies) == [(DEFERRED, "4.4.2")] * 2
    assert replies[0].text == f"conversation with {client.peer} timed out while sending DATA"
    assert not client.is_alive()


def test_a_server_that_hangs_after_the_final_dot_defers_everyone():
    def hang_after_dot(peer: Peer) -> None:
        accept_envelope(peer)
        peer.send("354 go ahead")
        peer.data()
        peer.wait_closed()

    with ScriptedServer(hang_after_dot) as server:
        client = connect(server, timeouts=patient_except(dot=SHORT))
        replies = client.send("s@example.org", ["a@example.org"], b"x\n")
    assert outcomes(replies) == [(DEFERRED, "4.4.2")]
    assert replies[0].text == (f"conversation with {client.peer} timed out while sending end of data -- "
                               "message may be sent more than once")


def test_a_server_that_stops_reading_the_message_times_out():
    def stop_reading(peer: Peer) -> None:
        accept_envelope(peer)
        peer.send("354 go ahead")
        peer.stall()

    with ScriptedServer(stop_reading, receive_buffer=4096) as server:
        client = connect(server, timeouts=patient_except(block=SHORT))
        started = time.monotonic()
        replies = client.send("s@example.org", ["a@example.org"], (b"y" * 999 + b"\n") * 16_000)
    assert time.monotonic() - started < 5
    assert outcomes(replies) == [(DEFERRED, "4.4.2")]
    assert replies[0].text == f"conversation with {client.peer} timed out while sending message body"


def test_a_server_that_drops_the_connection_mid_message():
    def drop_mid_message(peer: Peer) -> None:
        accept_envelope(peer, rcpts=2)
        peer.send("354 go ahead")
        peer.read_some(100_000)
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.sock.close()

    with ScriptedServer(drop_mid_message) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org", "b@example.org"], b"z" * 100 + b"\n" * 80_000)
    assert outcomes(replies) == [(DEFERRED, "4.4.2")] * 2
    assert replies[0].text.startswith(f"lost connection with {client.peer} while sending ")
    assert not client.is_alive()


@pytest.mark.parametrize("garbage", [b"hello, this is not SMTP\r\n", b"\x16\x03\x01\x02\x00\x01\x00\r\n",
                                     b"2x0 almost\r\n", b"220-ready\r\n250 other code\r\n", b"220+ready\r\n"])
def test_a_garbage_greeting_is_a_temporary_failure(garbage):
    def garbage_server(peer: Peer) -> None:
        peer.send(garbage)
        peer.wait_closed()

    with ScriptedServer(garbage_server) as server, pytest.raises(SMTPError) as caught:
        connect(server)
    reply = caught.value.reply
    assert (reply.status, reply.dsn) == (DEFERRED, "4.5.0")
    assert reply.text.startswith(f"host 127.0.0.1[127.0.0.1]:{server.port} sent a malformed reply while "
                                 "receiving the initial server greeting: ")


def test_garbage_in_the_middle_defers_everyone_and_closes():
    def garbage_later(peer: Peer) -> None:
        peer.greet()
        peer.expect("MAIL FROM:")
        peer.send("250 ok")
        peer.expect("RCPT TO:")
        peer.send("250 ok")
        peer.expect("RCPT TO:")
        peer.send("OK, fine, whatever")
        peer.wait_closed()

    with ScriptedServer(garbage_later) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org", "b@example.org"], b"x\n")
    assert outcomes(replies) == [(DEFERRED, "4.5.0")] * 2
    assert replies[0].text == (f"host {client.peer} sent a malformed reply while sending RCPT TO: "
                               "'OK, fine, whatever'")
    assert not client.is_alive()


def test_odd_codes_never_pass_for_success():
    def confused(peer: Peer) -> None:
        accept_envelope(peer)
        peer.send("250 2.0.0 sure, consider it delivered")
        peer.wait_closed()

    def wrong_greeting(peer: Peer) -> None:
        peer.send("250 hello")
        quit_or_hang_up(peer)

    with ScriptedServer(confused, wrong_greeting) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org"], b"x\n")
        with pytest.raises(SMTPError) as caught:
            connect(server)
    assert outcomes(replies) == [(DEFERRED, "4.5.0")]
    assert replies[0].text == f"host {client.peer} answered DATA with 250 2.0.0 sure, consider it delivered"
    assert not client.is_alive()
    assert (caught.value.reply.status, caught.value.reply.dsn) == (DEFERRED, "4.5.0")


@pytest.mark.parametrize("flood", ["long-line", "no-line-end", "endless-reply"])
def test_over_long_replies_are_cut_short(flood):
    def flooding_server(peer: Peer) -> None:
        if flood == "long-line":
            peer.send("220 " + "x" * 5000)
        elif flood == "no-line-end":
            peer.send(b"220 " + b"x" * 100_000)
        else:
            peer.send("220 ready")
            peer.expect("EHLO")
            peer.send(*(f"250-{'x' * 1000}" for _ in range(200)))
        peer.wait_closed()

    with ScriptedServer(flooding_server) as server:
        started = time.monotonic()
        with pytest.raises(SMTPError) as caught:
            connect(server)
    assert time.monotonic() - started < 5  # no waiting for a timeout
    reply = caught.value.reply
    assert (reply.status, reply.dsn) == (DEFERRED, "4.5.0")
    limit = "a reply longer than 65536 bytes" if flood == "endless-reply" else "a reply line longer than 2048 bytes"
    assert f"sent {limit} while " in reply.text


def test_421_at_the_greeting():
    def busy(peer: Peer) -> None:
        peer.send("421 4.3.2 mx.example.test service shutting down")

    with ScriptedServer(busy) as server, pytest.raises(SMTPError) as caught:
        connect(server)
    reply = caught.value.reply
    assert (reply.code, reply.status, reply.dsn, reply.local) == (421, DEFERRED, "4.3.2", False)
    assert reply.describe("mx") == "host mx said: 421 4.3.2 mx.example.test service shutting down"


def test_421_after_accepting_the_message_defers_everyone():
    def accept_then_421(peer: Peer) -> None:
        accept_envelope(peer, rcpts=2)
        peer.send("354 go ahead")
        peer.data()
        peer.send("421 4.3.0 out of spool space, closing connection")

    with ScriptedServer(accept_then_421) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org", "b@example.org"], b"x\n")
    assert outcomes(replies) == [(DEFERRED, "4.3.0")] * 2
    assert replies[0].describe(client.peer) == (f"host {client.peer} said: 421 4.3.0 out of spool space, "
                                                "closing connection (in reply to end of DATA command)")
    assert not client.is_alive()


def test_421_among_pipelined_rcpt_replies():
    def busy_midway(peer: Peer) -> None:
        peer.greet("PIPELINING")
        for _ in range(4):
            peer.line()
        peer.send("250 ok", "250 ok", "421 4.7.0 too many connections from your host")

    with ScriptedServer(busy_midway) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org", "b@example.org", "c@example.org"], b"x\n")
    assert outcomes(replies) == [(DEFERRED, "4.7.0")] * 3
    assert replies[0].text == "too many connections from your host"


def test_connection_refused():
    port = free_port()
    with pytest.raises(SMTPError) as caught:
        SMTPClient.connect("127.0.0.1", port, helo_name=HELO, timeouts=QUICK)
    reply = caught.value.reply
    assert (reply.status, reply.dsn) == (DEFERRED, "4.4.1")
    assert reply.text == f"connect to 127.0.0.1:{port}: Connection refused"


# -- STARTTLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA and a server context whose certificate names mx.example.test and 127.0.0.2."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(SERVER_NAME, "127.0.0.2").configure_cert(context)
    ca_file = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, str(ca_file)


def test_starttls_may_encrypts_without_verifying(pki):
    context, _ = pki
    with AioServer(tls_context=context) as server:
        client = connect(server, tls=TLS_MAY)
        replies = client.send("s@example.org", ["a@example.org"], b"secret\n")
        client.close()
    assert client.tls.startswith("TLSv1.") and not client.tls_verified
    assert outcomes(replies) == [(SENT, "2.0.0")]
    assert server.handler.hellos == [HELO, HELO]  # EHLO again inside TLS
    assert "STARTTLS" not in client.extensions


def test_over_tls_replies_cut_anywhere_are_put_together(pki):
    """Over TLS replies may come a few bytes at a time, lines cut across records; each reply is
    read whole."""
    context, _ = pki

    def dribble(peer: Peer) -> None:
        peer.greet("STARTTLS")
        peer.starttls(context, "PIPELINING")
        for command in ("MAIL FROM:", "RCPT TO:", "DATA"):
            peer.expect(command)
        for piece in (b"250 2.1", b".0 ok\r\n250 2.1.5 o", b"k\r\n35", b"4 go ahead\r\n"):
            peer.send(piece)
            time.sleep(0.02)
        peer.data()
        for piece in (b"250-2.0.0 que", b"ued\r\n250 2.0.0 as X\r\n"):
            peer.send(piece)
            time.sleep(0.02)
        quit_or_hang_up(peer)

    with ScriptedServer(dribble) as server:
        client = connect(server, tls=TLS_MAY)
        replies = client.send("s@example.org", ["a@example.org"], b"x\n")
        client.close()
    assert client.tls.startswith("TLSv1.")
    assert outcomes(replies) == [(SENT, "2.0.0")]
    assert str(replies[0]) == "250 2.0.0 queued as X"


def test_over_tls_a_server_that_stops_reading_the_message_times_out(pki):
    """A TLS write that cannot go on waits for the socket, within the block timeout."""
    context, _ = pki

    def stop_reading(peer: Peer) -> None:
        peer.greet("STARTTLS")
        peer.starttls(context)
        peer.expect("MAIL FROM:")
        peer.send("250 2.1.0 ok")
        peer.expect("RCPT TO:")
        peer.send("250 2.1.5 ok")
        peer.expect("DATA")
        peer.send("354 go ahead")
        peer.stall()

    with ScriptedServer(stop_reading, receive_buffer=4096) as server:
        client = connect(server, tls=TLS_MAY, timeouts=patient_except(block=SHORT))
        started = time.monotonic()
        replies = client.send("s@example.org", ["a@example.org"], (b"y" * 999 + b"\n") * 16_000)
    assert client.tls.startswith("TLSv1.")
    assert time.monotonic() - started < 5
    assert outcomes(replies) == [(DEFERRED, "4.4.2")]
    assert replies[0].text == f"conversation with {client.peer} timed out while sending message body"


def test_starttls_may_handshake_failure_allows_a_plain_retry():
    def broken_tls(peer: Peer) -> None:
        peer.greet("STARTTLS")
        peer.expect("STARTTLS")
        peer.send("220 2.0.0 go ahead")
        peer.sock.recv(65536)  # the client hello
        peer.send(b"this is not a TLS server hello\r\n")
        peer.wait_closed()

    def plain(peer: Peer) -> None:
        accept_envelope(peer, "STARTTLS")
        peer.send("354 go ahead")
        peer.data()
        peer.send("250 ok")
        quit_or_hang_up(peer)

    with ScriptedServer(broken_tls, plain) as server:
        with pytest.raises(TLSFallback) as caught:
            connect(server, tls=TLS_MAY)
        client = connect(server, tls=TLS_NONE)
        replies = client.send("s@example.org", ["a@example.org"], b"x\n")
        client.close()
    assert isinstance(caught.value, SMTPError)
    reply = caught.value.reply
    assert (reply.status, reply.dsn) == (DEFERRED, "4.7.5")
    assert reply.text.startswith(f"TLS handshake with 127.0.0.1[127.0.0.1]:{server.port} failed: ")
    assert outcomes(replies) == [(SENT, "2.0.0")] and client.tls == ""


def test_starttls_may_goes_on_in_plain_text_when_starttls_is_refused():
    def no_tls_today(peer: Peer) -> None:
        peer.greet("STARTTLS")
        peer.expect("STARTTLS")
        peer.send("454 4.7.0 TLS not available due to temporary reason")
        accept_rest = peer.expect("MAIL FROM:")
        assert accept_rest == "MAIL FROM:<s@example.org>"
        peer.send("250 ok")
        peer.expect("RCPT TO:")
        peer.send("250 ok")
        peer.expect("DATA")
        peer.send("354 go ahead")
        peer.data()
        peer.send("250 ok")
        quit_or_hang_up(peer)

    with ScriptedServer(no_tls_today) as server:
        client = connect(server, tls=TLS_MAY)
        replies = client.send("s@example.org", ["a@example.org"], b"x\n")
        client.close()
    assert client.tls == ""
    assert outcomes(replies) == [(SENT, "2.0.0")]


def test_starttls_encrypt_verifies_the_certificate_against_the_next_hop_name(pki):
    context, ca_file = pki
    with AioServer(host="127.0.0.2", tls_context=context) as server:
        client = SMTPClient.connect(SERVER_NAME, server.port, ip="127.0.0.2", helo_name=HELO, timeouts=QUICK,
                                    tls=TLS_ENCRYPT, ca_file=ca_file)
        replies = client.send("s@example.org", ["a@example.org"], b"x\n")
        client.close()
    assert client.tls_verified and client.tls.startswith("TLSv1.")
    assert outcomes(replies) == [(SENT, "2.0.0")]


@pytest.mark.parametrize("how", ["tls_name", "ip-address-in-certificate"])
def test_starttls_encrypt_to_an_address_literal(pki, how):
    context, ca_file = pki
    with AioServer(host="127.0.0.2", tls_context=context) as server:
        client = SMTPClient.connect("127.0.0.2", server.port, helo_name=HELO, timeouts=QUICK, tls=TLS_ENCRYPT,
                                    ca_file=ca_file, tls_name=SERVER_NAME if how == "tls_name" else None)
        client.close()
    assert client.tls_verified


@pytest.mark.parametrize("case", ["wrong-name", "unknown-ca"])
def test_starttls_encrypt_refuses_an_unverified_certificate(pki, case):
    context, ca_file = pki
    name, trusted = ("other.example.test", ca_file) if case == "wrong-name" else (SERVER_NAME, None)
    with AioServer(host="127.0.0.2", tls_context=context) as server, pytest.raises(SMTPError) as caught:
        SMTPClient.connect(name, server.port, ip="127.0.0.2", helo_name=HELO, timeouts=QUICK,
                           tls=TLS_ENCRYPT, ca_file=trusted)
    assert not isinstance(caught.value, TLSFallback)
    reply = caught.value.reply
    assert (reply.status, reply.dsn) == (DEFERRED, "4.7.5")
    assert reply.text.startswith(f"server certificate of {name}[127.0.0.2]:{server.port} not verified for {name}: ")
    assert server.handler.messages == []


def test_starttls_encrypt_with_a_missing_ca_file_never_starts_tls(pki):
    context, _ = pki
    with AioServer(tls_context=context) as server, pytest.raises(SMTPError) as caught:
        connect(server, tls=TLS_ENCRYPT, ca_file="/nonexistent/ca.pem")
    reply = caught.value.reply
    assert (reply.status, reply.dsn) == (DEFERRED, "4.7.5")
    assert reply.text.startswith("cannot load CA file /nonexistent/ca.pem: ")
    assert server.handler.hellos == [HELO] and server.handler.commands == ["QUIT"]


def test_data_injected_before_the_tls_handshake_ends_the_session():
    def injecting(peer: Peer) -> None:
        peer.greet("STARTTLS")
        peer.expect("STARTTLS")
        peer.send("220 2.0.0 go ahead", "250 injected in plain text")
        peer.wait_closed()

    with ScriptedServer(injecting) as server, pytest.raises(SMTPError) as caught:
        connect(server, tls=TLS_MAY)
    assert not isinstance(caught.value, TLSFallback)
    reply = caught.value.reply
    assert (reply.status, reply.dsn) == (DEFERRED, "4.5.0")
    assert reply.text == f"host 127.0.0.1[127.0.0.1]:{server.port} sent data after its STARTTLS reply"


def test_starttls_encrypt_when_the_server_does_not_offer_it():
    with AioServer() as server, pytest.raises(SMTPError) as caught:
        connect(server, tls=TLS_ENCRYPT)
    reply = caught.value.reply
    assert (reply.status, reply.dsn) == (DEFERRED, "4.7.4")
    assert reply.text == f"TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]:{server.port}"
    assert server.handler.commands == ["QUIT"]


# -- AUTH ----------------------------------------------------------------------------------------


class Accounts:
    """An aiosmtpd authenticator with one account, remembering every attempt."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, bytes, bytes]] = []

    def __call__(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        self.attempts.append((mechanism, auth_data.login, auth_data.password))
        success = (auth_data.login, auth_data.password) == (b"user", b"s3cr\xc3\xa9t")
        return AuthResult(success=success, handled=False)  # handled=True would make aiosmtpd say nothing


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_after_starttls(pki, mechanism):
    context, _ = pki
    accounts = Accounts()
    excluded = [m for m in ("PLAIN", "LOGIN") if m != mechanism]
    with AioServer(tls_context=context, authenticator=accounts, auth_required=True,
                   auth_exclude_mechanism=excluded) as server:
        client = connect(server, tls=TLS_MAY, auth=("user", "s3cr\u00e9t"))
        replies = client.send("s@example.org", ["a@example.org"], b"x\n")
        client.close()
    assert client.authenticated
    assert accounts.attempts == [(mechanism, b"user", b"s3cr\xc3\xa9t")]
    assert outcomes(replies) == [(SENT, "2.0.0")]


def test_failed_auth_is_a_temporary_failure(pki):
    context, _ = pki
    with AioServer(tls_context=context, authenticator=Accounts()) as server, pytest.raises(SMTPError) as caught:
        connect(server, tls=TLS_MAY, auth=("user", "wrong"))
    reply = caught.value.reply
    assert (reply.status, reply.dsn) == (DEFERRED, "4.7.8"), reply.text
    assert reply.text == (f"SASL authentication failed; host 127.0.0.1[127.0.0.1]:{server.port} said: "
                          "535 5.7.8 Authentication credentials invalid (in reply to AUTH command)")


def test_credentials_are_not_sent_unencrypted_unless_allowed():
    accounts = Accounts()
    with AioServer(authenticator=accounts, auth_require_tls=False) as server:
        with pytest.raises(SMTPError) as caught:
            connect(server, auth=("user", "s3cr\u00e9t"))
        assert accounts.attempts == []
        client = connect(server, auth=("user", "s3cr\u00e9t"), allow_plaintext_auth=True)
        client.close()
    reply = caught.value.reply
    assert (reply.status, reply.dsn) == (DEFERRED, "4.7.0")
    assert reply.text == (f"not sending credentials to host 127.0.0.1[127.0.0.1]:{server.port} "
                          "over an unencrypted connection")
    assert client.authenticated and len(accounts.attempts) == 1


def test_auth_configured_but_not_offered_is_a_temporary_failure():
    with AioServer() as server, pytest.raises(SMTPError) as caught:  # AUTH only after STARTTLS, none here
        connect(server, auth=("user", "pw"))
    reply = caught.value.reply
    assert (reply.status, reply.dsn) == (DEFERRED, "4.7.0")
    assert "offers no AUTH" in reply.text


def test_a_reply_without_an_enhanced_code_is_quoted_as_the_server_wrote_it():
    handler = Recorder(rcpt={"gone@example.org": "550 no such user"}, data="250 Ok: queued as 0001")
    with AioServer(handler) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org", "gone@example.org"], b"x\n")
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0"), (BOUNCED, "5.0.0")]  # the status code is derived
    assert str(replies[0]) == "250 Ok: queued as 0001"
    assert replies[1].describe(client.peer) == (f"host {client.peer} said: 550 no such user "
                                                "(in reply to RCPT TO command)")


# -- lines too long for the wire ---------------------------------------------------------------

LONG_HEADER = (b"X-Long: " + b" ".join(b"w%07d" % i for i in range(400)))[:3000]
LONG_BODY_LINE = bytes(33 + i % 94 for i in range(5000))  # no white space anywhere


def unfold(header: bytes) -> bytes:
    return re.sub(rb"\r?\n(?=[ \t])", b"", header)


def test_a_strict_server_gets_long_lines_wrapped_and_takes_the_message():
    """aiosmtpd refuses a message with a line over 998 octets (500 Line too long)."""
    message = b"Subject: long lines\n" + LONG_HEADER + b"\n\nshort\n" + LONG_BODY_LINE + b"\nlast\n"
    with AioServer() as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org"], message)
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0")]
    content = server.handler.messages[0].content
    assert all(len(line) <= 998 for line in content.split(b"\r\n"))
    header, _, body = content.partition(b"\r\n\r\n")
    assert unfold(header) == b"Subject: long lines\r\n" + LONG_HEADER
    lines = body.split(b"\r\n")
    assert lines[0] == b"short" and lines[-2:] == [b"last", b""]
    assert b"".join(lines[1:-2]) == LONG_BODY_LINE


def test_wrap_long_lines_folds_headers_at_white_space_and_splits_body_lines():
    addresses = b"To: " + b", ".join(b"user%04d@example.org" % i for i in range(100))
    wrapped = wrap_long_lines(addresses + b"\n\n" + b"z" * 2500 + b"\n")
    header, _, body = wrapped.partition(b"\n\n")
    assert all(0 < len(line) <= 998 for line in header.split(b"\n"))
    assert all(line.startswith(b" ") for line in header.split(b"\n")[1:])
    assert header.replace(b"\n", b"") == addresses  # folded only at white space: unfolding restores it
    assert body.split(b"\n") == [b"z" * 998, b"z" * 998, b"z" * 504, b""]


def test_wrap_long_lines_splits_a_header_without_white_space_with_an_added_space():
    token = b"X-Token:" + b"a" * 2000
    assert wrap_long_lines(token) == b"X-Token:" + b"a" * 990 + b"\n " + b"a" * 997 + b"\n " + b"a" * 13


def test_wrap_long_lines_leaves_lines_at_the_limit_and_the_first_line_is_checked_too():
    fits = b"Subject: " + b"s" * 989 + b"\n\n" + b"b" * 998 + b"\n"
    assert wire_data(fits) == fits.replace(b"\n", b"\r\n") + b".\r\n"
    first_too_long = b"X: " + b"y" * 1200 + b"\n\nbody\n"
    lines = wire_data(first_too_long).split(b"\r\n")
    assert [len(line) for line in lines] == [2, 998, 204, 0, 4, 1, 0]  # "X:", then " y..." folded
