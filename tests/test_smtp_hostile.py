"""SMTP and LMTP delivery through the real daemon when the next hop misbehaves or is picky:
hostile relay hosts (silent, hanging, dropping, babbling, shouting, giving up), failover down a
relay list, LMTP per-recipient results, recipient limits, SIZE, SMTPUTF8 and DSN parameters.

Real aiosmtpd servers, raw scripted peers and a real DNS server, loopback only. A hostile peer
serves hostile.test and a good one good.test, both on the one `smtp-port`, so one daemon shows
both that a message to the hostile peer waits in deferred/ and that the same worker goes on
delivering the next message.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from router.spool import Spool
from router.spool.queue_file import DELIVERED, FAILED, PENDING, QueueFile, parse
from tests.daemon import qrouter, reachable, wait_for
from tests.dns_server import DNSServer
from tests.smtp_servers import AioServer, Peer, Recorder, ScriptedServer
from workers.smtp_wire import wire_data

# 3 s, not less: they apply to the good aiosmtpd server in this process too, which load may hold up
FAST = ["--smtp-timeouts", "connect=2,greeting=3,helo=3,mail=3,rcpt=3,data=3,block=3,dot=3,rset=3,quit=3",
        "--smtp-idle-timeout", "0.5", "--min-backoff", "60", "--me", "relay.qrouter.test"]

ZONE = """
hostile.test. 60 IN MX 10 mx.hostile.test.
mx.hostile.test. 60 IN A 127.0.0.2
good.test. 60 IN MX 10 mx.good.test.
mx.good.test. 60 IN A 127.0.0.3
"""

HOSTILE_RCPTS = ["a@hostile.test", "b@hostile.test"]
BODY = b"Subject: hostile\n\n.leading dot\nline two\r\nno final newline"
LATER = b"Subject: later\r\n\r\nafter the hostile one\r\n"


def enqueue(daemon, recipients, body=b"Subject: t\r\n\r\nbody\r\n", sender="s@example.org", **dsn) -> str:
    return Spool(daemon.spool).enqueue(sender, recipients, body, **dsn)


def stored(daemon, queue: str, queue_id: str) -> QueueFile:
    path = daemon.spool / queue / queue_id
    return parse(path.read_bytes(), str(path))


def log_line(daemon, queue_id: str, address: str) -> str:
    """The one delivery line for `address` in the daemon's log."""
    lines = [ln for ln in daemon.log().splitlines() if f"{queue_id}: to=<{address}>," in ln]
    assert len(lines) == 1, f"expected one line for {address}, got {lines}"
    return lines[0]


def worker_pid(line: str) -> int:
    found = re.search(r" qrouter/[a-z]+\[(\d+)\]: ", line)
    assert found, line
    return int(found[1])


def removed(daemon, *queue_ids: str):
    return lambda: all(f"{q}: removed" in daemon.log() for q in queue_ids)


class ScriptedOn(ScriptedServer):
    """A ScriptedServer on a chosen port: every MX host listens on the one `smtp-port`."""

    def __init__(self, *scripts, host: str, port: int, receive_buffer: int | None = None) -> None:
        super().__init__(*scripts, host=host)
        self.listener.close()
        self.listener = socket.socket()
        if receive_buffer:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.listener.bind((host, port))
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.port = port


@contextmanager
def hostile_and_good(*scripts, receive_buffer: int | None = None) -> Iterator[tuple[ScriptedServer, AioServer,
                                                                                      DNSServer]]:
    """The scripted peer as the MX of hostile.test, aiosmtpd as the MX of good.test, same port."""
    for _ in range(20):
        good = AioServer(host="127.0.0.3")
        try:
            hostile = ScriptedOn(*scripts, host="127.0.0.2", port=good.port, receive_buffer=receive_buffer)
            break
        except OSError:
            continue
    else:
        raise RuntimeError("no port free on both 127.0.0.2 and 127.0.0.3")
    with DNSServer(ZONE, origin="test.") as dns, good, hostile:
        yield hostile, good, dns


def crlf(body: bytes) -> bytes:
    """A message as SMTP carries it: CRLF line ends, one after the last line too."""
    data = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def hostile_mx_defers(daemons, script, dsn: str, reply: str, body: bytes = BODY,
                      receive_buffer: int | None = None) -> ScriptedServer:
    """Send one message to two recipients at hostile.test and one at good.test, then a later
    message to good.test alone. Check that the hostile recipients wait in deferred/ with `dsn`
    and a reply matching the regular expression `reply` (PEER stands for the hostile peer),
    that the good one got the message, that the queue file keeps the exact bytes, and that the
    one worker delivered the later message."""
    with hostile_and_good(script, receive_buffer=receive_buffer) as (hostile, good, dns):
        daemon = daemons("--dns-servers", dns.servers, "--smtp-port", str(good.port), *FAST, workers=1,
                         maildir=False)
        queue_id = enqueue(daemon, [*HOSTILE_RCPTS, "m@good.test"], body)
        wait_for((daemon.spool / "deferred" / queue_id).exists, what="the hostile message deferred")
        later = enqueue(daemon, ["c@good.test"], LATER)
        wait_for(removed(daemon, later), what="the later message delivered")
        assert daemon.process.poll() is None
    peer = f"mx.hostile.test[127.0.0.2]:{hostile.port}"
    good_peer = f"mx.good.test[127.0.0.3]:{good.port}"
    assert [(m.rcpt_tos, m.content) for m in good.handler.messages] == [
        (["m@good.test"], crlf(body)), (["c@good.test"], LATER)]

    kept = stored(daemon, "deferred", queue_id)
    assert kept.message == body
    assert kept.attempts == 1
    expected = re.compile(reply.replace("PEER", re.escape(peer)))
    *hostile_rcpts, good_rcpt = kept.recipients
    for rcpt, address in zip(hostile_rcpts, HOSTILE_RCPTS, strict=True):
        assert (rcpt.address, rcpt.state, rcpt.dsn, rcpt.relay) == (address, PENDING, dsn, peer)
        assert expected.fullmatch(rcpt.reply), rcpt.reply
        line = log_line(daemon, queue_id, address)
        assert f"relay={peer}, " in line
        assert line.endswith(f", dsn={dsn}, status=deferred ({rcpt.reply}), attempts=1"), line
    assert (good_rcpt.address, good_rcpt.state, good_rcpt.dsn, good_rcpt.relay) == (
        "m@good.test", DELIVERED, "2.0.0", good_peer)
    log = daemon.log()
    assert "Traceback" not in log and "error:" not in log
    later_line = log_line(daemon, later, "c@good.test")
    assert f"relay={good_peer}, " in later_line
    assert later_line.endswith("dsn=2.0.0, status=sent (250 2.0.0 queued as 4711), attempts=1")
    # the one worker that met the hostile peer lived on to deliver the later message
    assert worker_pid(later_line) == worker_pid(log_line(daemon, queue_id, HOSTILE_RCPTS[0]))
    return hostile


def take_envelope(peer: Peer, data_reply: str = "354 go ahead", pipelining: bool = False) -> None:
    """EHLO, then 250 to MAIL and to the RCPT of each hostile recipient, and `data_reply` to DATA.
    With `pipelining` offered the client may send them all at once; the answers are the same."""
    peer.greet(*["PIPELINING"] * pipelining)
    peer.expect("MAIL FROM:")
    peer.send("250 2.1.0 ok")
    for _ in HOSTILE_RCPTS:
        peer.expect("RCPT TO:")
        peer.send("250 2.1.5 ok")
    peer.expect("DATA")
    peer.send(data_reply)


# -- hostile next hops ------------------------------------------------------------------------


def test_server_that_never_greets(daemons):
    def silent(peer: Peer) -> None:
        peer.stall()

    hostile_mx_defers(daemons, silent, "4.4.2",
                      r"conversation with PEER timed out while receiving the initial server greeting")


def test_server_that_hangs_after_the_final_dot(daemons):
    wires: list[bytes] = []

    def hang(peer: Peer) -> None:
        take_envelope(peer, pipelining=True)
        wires.append(peer.data())
        peer.stall()

    hostile_mx_defers(daemons, hang, "4.4.2", r"conversation with PEER timed out while sending end of data "
                                              r"-- message may be sent more than once")
    assert wires == [wire_data(BODY)]  # the whole message went; only the answer never came


def test_server_that_stops_reading_mid_message(daemons):
    body = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 75_000  # 6 MB, more than socket buffers hold

    def stop_reading(peer: Peer) -> None:
        take_envelope(peer)
        peer.stall()

    hostile_mx_defers(daemons, stop_reading, "4.4.2", r"conversation with PEER timed out while sending message body",
                      body=body, receive_buffer=4096)


def test_server_that_drops_the_connection_mid_message(daemons):
    body = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 40_000  # 3.2 MB, more than socket buffers hold
    got: list[int] = []

    def drop(peer: Peer) -> None:
        take_envelope(peer)
        got.append(len(peer.read_some(100_000)))
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.sock.close()  # a reset, with most of the message still on its way

    hostile_mx_defers(daemons, drop, "4.4.2", r"lost connection with PEER while sending (message body|end of data "
                                              r"-- message may be sent more than once)( \(.+\))?", body=body)
    assert got == [100_000]


def test_server_that_answers_garbage(daemons):
    def babble(peer: Peer) -> None:
        peer.greet()
        peer.expect("MAIL FROM:")
        peer.send(b"\x00\x01garbage \xff\xfe\r\n")
        peer.wait_closed()

    hostile = hostile_mx_defers(daemons, babble, "4.5.0", r"host PEER sent a malformed reply while sending "
                                                          r"MAIL FROM: '\?\?garbage \ufffd\ufffd'")
    assert hostile.peers[0].lines[-1].startswith("MAIL FROM:")  # nothing more after the garbage


@pytest.mark.parametrize("where", ["one line at RCPT", "endless reply to EHLO"])
def test_server_with_over_long_replies(daemons, where):
    def shout(peer: Peer) -> None:
        if where == "one line at RCPT":
            peer.greet()
            peer.expect("MAIL FROM:")
            peer.send("250 2.1.0 ok")
            peer.expect("RCPT TO:")
            peer.send("550 5.1.1 " + "x" * 10_000)  # a 5xx, but not one to believe
        else:
            peer.send("220 mx.example.test ESMTP")
            peer.expect("EHLO")
            try:
                peer.send(*["250-" + "y" * 1000] * 80)
            except OSError:
                pass  # the client hung up halfway, as it should
        peer.wait_closed()

    if where == "one line at RCPT":
        reply = r"host PEER sent a reply line longer than 2048 bytes while sending RCPT TO"
    else:
        reply = r"host PEER sent a reply longer than 65536 bytes while sending EHLO"
    hostile = hostile_mx_defers(daemons, shout, "4.5.0", reply)
    last = hostile.peers[0].lines[-1]
    assert last.startswith("RCPT TO:" if where == "one line at RCPT" else "EHLO")  # nothing more after it


def test_a_server_that_never_answers_quit_holds_up_no_one(daemons):
    """The message is taken; the connection is then idle and closed, and the server never answers
    QUIT (a tarpit). The worker's main thread waits for that answer a short while only, with the
    quit timeout at its default of 20 s: the supervisor never finds it silent, and the worker that
    delivered stays, to deliver the next message."""
    closed: list[bytes] = []

    def tarpit_at_quit(peer: Peer) -> None:
        take_envelope(peer)
        peer.data()
        peer.send("250 2.0.0 taken")
        closed.append(peer.wait_closed())  # QUIT, then nothing said back until the client hangs up

    with hostile_and_good(tarpit_at_quit) as (_, good, dns):
        daemon = daemons("--dns-servers", dns.servers, "--smtp-port", str(good.port), "--smtp-idle-timeout", "0.5",
                         "--me", "relay.qrouter.test", workers=1, maildir=False)
        queue_id = enqueue(daemon, HOSTILE_RCPTS)
        wait_for(removed(daemon, queue_id), what="the message taken by the tarpit")
        wait_for(lambda: closed, timeout=10, what="the idle connection closed by the client")
        later = enqueue(daemon, ["c@good.test"], LATER)
        wait_for(removed(daemon, later), what="the later message delivered")
    assert closed == [b"QUIT\r\n"]
    assert "has not answered" not in daemon.log()
    assert worker_pid(log_line(daemon, later, "c@good.test")) == worker_pid(log_line(daemon, queue_id,
                                                                                       HOSTILE_RCPTS[0]))


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize("when", ["DATA", "end of DATA"])
def test_server_that_takes_the_recipients_then_says_421(daemons, when, pipelining):
    goodbye = "421 4.3.2 shutting down, come back later"

    def give_up(peer: Peer) -> None:
        if when == "DATA":
            take_envelope(peer, data_reply=goodbye, pipelining=pipelining)
        else:
            take_envelope(peer, pipelining=pipelining)
            peer.data()
            peer.send(goodbye)
        peer.wait_closed()

    hostile_mx_defers(daemons, give_up, "4.3.2",
                      rf"host PEER said: {re.escape(goodbye)} \(in reply to {when} command\)")


# -- failover down the relay list -------------------------------------------------------------


def test_failover_mid_list_in_the_same_attempt(daemons):
    def busy(peer: Peer) -> None:
        peer.send("421 4.3.2 too busy, try another server")
        peer.wait_closed()

    picky = Recorder(rcpt={"b@example.org": "450 4.2.1 mailbox busy, try elsewhere"})
    with ScriptedServer(busy, host="127.0.0.2") as first, AioServer(picky, host="127.0.0.3") as second, \
            AioServer(host="127.0.0.4") as third:
        relays = f"[127.0.0.2]:{first.port},[127.0.0.3]:{second.port},[127.0.0.4]:{third.port}"
        daemon = daemons("--relayhost", relays, *FAST, workers=1)
        queue_id = enqueue(daemon, ["a@example.org", "b@example.org"])
        wait_for(removed(daemon, queue_id), what="delivery")
    assert first.connections == 1
    assert [m.rcpt_tos for m in second.handler.messages] == [["a@example.org"]]
    assert [m.rcpt_tos for m in third.handler.messages] == [["b@example.org"]]
    assert third.handler.commands[:2] == ["MAIL s@example.org", "RCPT b@example.org"]
    a_line = log_line(daemon, queue_id, "a@example.org")
    b_line = log_line(daemon, queue_id, "b@example.org")
    assert f"relay=127.0.0.3[127.0.0.3]:{second.port}, " in a_line
    assert f"relay=127.0.0.4[127.0.0.4]:{third.port}, " in b_line
    for line in (a_line, b_line):
        assert line.endswith(", dsn=2.0.0, status=sent (250 2.0.0 queued as 4711), attempts=1")
    assert daemon.files("deferred") == []


# -- LMTP as the next hop ---------------------------------------------------------------------


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_lmtp_next_hop_with_mixed_results_after_data(daemons, over):
    handler = Recorder(lmtp={"gone@example.org": "550 5.1.1 no such user",
                             "full@example.org": "452 4.2.2 mailbox full"})
    directory = tempfile.mkdtemp(prefix="lmtp")  # short: a socket path has a length limit
    socket_path = os.path.join(directory, "lmtp.sock")
    body = b"Subject: lmtp\r\n\r\n.dot\r\n"
    try:
        server = AioServer(handler, lmtp=True, unix_socket=socket_path if over == "unix" else None)
        with server:
            if over == "unix":  # as Dovecot makes its LMTP socket for the MTA's user
                reachable(Path(directory))
                os.chmod(socket_path, 0o777)
            hop = f"lmtp:{socket_path}" if over == "unix" else f"lmtp:127.0.0.1:{server.port}"
            daemon = daemons("--default-transport", hop, *FAST, workers=1)
            queue_id = enqueue(daemon, ["ok@example.org", "gone@example.org", "full@example.org"], body)
            wait_for((daemon.spool / "deferred" / queue_id).exists, what="deferral")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    peer = f"unix[{socket_path}]" if over == "unix" else f"127.0.0.1[127.0.0.1]:{server.port}"
    [received] = handler.messages
    assert received.rcpt_tos == ["ok@example.org", "gone@example.org", "full@example.org"]
    assert received.content == body
    kept = stored(daemon, "deferred", queue_id)
    assert [(r.address, r.state, r.dsn, r.relay) for r in kept.recipients] == [
        ("ok@example.org", DELIVERED, "2.0.0", peer), ("gone@example.org", FAILED, "5.1.1", peer),
        ("full@example.org", PENDING, "4.2.2", peer)]
    assert kept.message == body
    expected = {
        "ok@example.org": "dsn=2.0.0, status=sent (250 2.0.0 delivered)",
        "gone@example.org": f"dsn=5.1.1, status=bounced (host {peer} said: 550 5.1.1 no such user "
                            "(in reply to end of DATA command))",
        "full@example.org": f"dsn=4.2.2, status=deferred (host {peer} said: 452 4.2.2 mailbox full "
                            "(in reply to end of DATA command))",
    }
    for address, end in expected.items():
        line = log_line(daemon, queue_id, address)
        assert "qrouter/lmtp[" in line and f"relay={peer}, " in line and line.endswith(f"{end}, attempts=1"), line


# -- the server's recipient limit -------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [False, True])
def test_too_many_recipients_go_in_more_transactions_of_the_same_attempt(daemons, pipelining):
    handler = Recorder(max_rcpt=2, extensions=["PIPELINING"] if pipelining else [])
    recipients = [f"u{i}@example.org" for i in range(5)]
    body = b"Subject: many\r\n\r\nfive of you\r\n"
    with AioServer(handler) as sink:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{sink.port}", *FAST, workers=1)
        queue_id = enqueue(daemon, recipients, body)
        wait_for(removed(daemon, queue_id), what="delivery")
    assert [m.rcpt_tos for m in handler.messages] == [recipients[0:2], recipients[2:4], recipients[4:]]
    assert all(m.content == body for m in handler.messages)
    for address in recipients:
        line = log_line(daemon, queue_id, address)
        assert f"relay=127.0.0.1[127.0.0.1]:{sink.port}, " in line
        assert line.endswith(", dsn=2.0.0, status=sent (250 2.0.0 queued as 4711), attempts=1")
    assert daemon.files("deferred") == []


# -- SIZE and SMTPUTF8 --------------------------------------------------------------------------


def test_message_larger_than_the_servers_size_limit_bounces_unsent(daemons):
    body = b"Subject: large\r\n\r\n" + b"z" * 998 + b"\r\n"
    with AioServer(data_size_limit=500) as sink:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{sink.port}", "--archive-failed", "yes", *FAST)
        queue_id = enqueue(daemon, ["a@example.org", "b@example.org"], body)
        wait_for(lambda: f"{queue_id}: archived" in daemon.log(), what="the bounce")
    assert sink.handler.messages == []
    assert not any(c.startswith(("MAIL", "RCPT", "DATA")) for c in sink.handler.commands)
    peer = f"127.0.0.1[127.0.0.1]:{sink.port}"
    kept = stored(daemon, "archive", queue_id)
    assert kept.message == body
    reason = f"message size {len(body)} exceeds size limit 500 of server {peer}"
    for rcpt in kept.recipients:
        assert (rcpt.state, rcpt.dsn, rcpt.reply, rcpt.relay) == (FAILED, "5.3.4", reason, peer)
        assert log_line(daemon, queue_id, rcpt.address).endswith(f"dsn=5.3.4, status=bounced ({reason}), attempts=1")


def test_utf8_recipient_bounces_at_a_server_without_smtputf8_and_the_ascii_one_is_sent(daemons):
    body = b"Subject: hello\r\n\r\nfor both\r\n"
    with AioServer() as sink:  # aiosmtpd without SMTPUTF8
        daemon = daemons("--relayhost", f"[127.0.0.1]:{sink.port}", "--archive-failed", "yes", *FAST)
        queue_id = enqueue(daemon, ["j\u00f6rg@example.org", "plain@example.org"], body)
        wait_for(lambda: f"{queue_id}: archived" in daemon.log(), what="delivery and bounce")
    [received] = sink.handler.messages
    assert (received.rcpt_tos, received.content) == (["plain@example.org"], body)
    assert received.mail_options == [f"SIZE={len(body)}"]  # no SMTPUTF8
    assert [c for c in sink.handler.commands if c.startswith("RCPT")] == ["RCPT plain@example.org"]
    peer = f"127.0.0.1[127.0.0.1]:{sink.port}"
    reason = f"SMTPUTF8 is required, but was not offered by host {peer}"
    kept = stored(daemon, "archive", queue_id)
    assert [(r.address, r.state, r.dsn) for r in kept.recipients] == [
        ("j\u00f6rg@example.org", FAILED, "5.6.7"), ("plain@example.org", DELIVERED, "2.0.0")]
    assert kept.recipients[0].reply == reason
    assert log_line(daemon, queue_id, "j\u00f6rg@example.org").endswith(
        f"dsn=5.6.7, status=bounced ({reason}), attempts=1")
    assert log_line(daemon, queue_id, "plain@example.org").endswith(
        "dsn=2.0.0, status=sent (250 2.0.0 queued as 4711), attempts=1")


# -- DSN parameters -----------------------------------------------------------------------------


def test_dsn_parameters_reach_a_server_that_offers_dsn(daemons):
    wires: list[bytes] = []

    def dsn_server(peer: Peer) -> None:
        peer.greet("PIPELINING", "DSN", "SIZE 1000000", "ENHANCEDSTATUSCODES")
        while True:
            line = peer.line().upper()
            if line == "QUIT":
                peer.send("221 2.0.0 bye")
                return
            if line == "DATA":
                peer.send("354 go ahead")
                wires.append(peer.data())
            peer.send("250 2.0.0 ok")

    cli_body = b"Subject: from the command line\r\n\r\nnotify me\r\n"
    api_body = b"Subject: from the API\r\n\r\nheaders only\r\n"
    with ScriptedServer(dsn_server, dsn_server) as server:  # a second connection if the first went idle
        daemon = daemons("--relayhost", f"[127.0.0.1]:{server.port}", *FAST, workers=1)
        first = qrouter("enqueue", "--queue-dir", str(daemon.spool), "--notify", "SUCCESS,FAILURE",
                        "-f", "s@example.org", "a@example.org", "b@example.org", stdin=cli_body,
                        check=True).stdout.decode().strip()
        wait_for(removed(daemon, first), what="the first delivery")
        second = enqueue(daemon, ["c@example.org"], api_body, notify="DELAY,FAILURE", envid="Q1+2=3", ret="HDRS")
        wait_for(removed(daemon, second), what="the second delivery")
        wait_for(lambda: all(p.lines[-1:] == ["QUIT"] for p in server.peers), what="QUIT after the idle timeout")
    trace = wires[0][:-len(wire_data(cli_body))]  # the Received: line `qrouter enqueue` adds
    assert trace.startswith(b"Received: by ") and wires[0].endswith(wire_data(cli_body))
    assert [ln for p in server.peers for ln in p.lines if ln.startswith(("MAIL", "RCPT"))] == [
        f"MAIL FROM:<s@example.org> SIZE={len(trace) + len(cli_body)}",
        "RCPT TO:<a@example.org> NOTIFY=SUCCESS,FAILURE",
        "RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE",
        f"MAIL FROM:<s@example.org> SIZE={len(api_body)} RET=HDRS ENVID=Q1+2B2+3D3",
        "RCPT TO:<c@example.org> NOTIFY=DELAY,FAILURE",
    ]
    assert wires[1:] == [wire_data(api_body)]
    for queue_id, address in ((first, "a@example.org"), (first, "b@example.org"), (second, "c@example.org")):
        assert log_line(daemon, queue_id, address).endswith("dsn=2.0.0, status=sent (250 2.0.0 ok), attempts=1")


def test_no_dsn_parameters_to_a_server_without_dsn(daemons):
    body = b"Subject: plain\r\n\r\nno dsn here\r\n"
    with AioServer() as sink:  # aiosmtpd offers no DSN
        daemon = daemons("--relayhost", f"[127.0.0.1]:{sink.port}", *FAST)
        queue_id = enqueue(daemon, ["a@example.org", "b@example.org"], body, notify="SUCCESS,FAILURE",
                           envid="Q1", ret="FULL")
        wait_for(removed(daemon, queue_id), what="delivery")
    [received] = sink.handler.messages
    assert received.rcpt_tos == ["a@example.org", "b@example.org"]
    assert received.mail_options == [f"SIZE={len(body)}"]
    assert received.rcpt_options == [[], []]
    assert received.content == body
