"""CHUNKING (RFC 3030): the SMTP/LMTP client sends a message as one BDAT LAST, pipelined with
its envelope, and BINARYMIME where DATA cannot carry it; a server that offers CHUNKING but fails
BDAT gets DATA. aiosmtpd does not speak BDAT, so the server is CountingSink (which does, and
records every round the client made it wait) or a scripted one; loopback only."""

from __future__ import annotations

from dataclasses import replace

import pytest

from policy.tls_policy import TLS_NONE
from router.config.timeouts import Timeouts
from router.spool import Spool
from tests.daemon import wait_for
from tests.smtp_servers import CountingSink, Peer, ScriptedServer
from workers.smtp_client import SMTPClient
from workers.smtp_wire import wire_data
from workers.transport import BOUNCED, DEFERRED, SENT

HELO = "client.example.net"
QUICK = Timeouts.uniform(5)
CHUNKING = ("PIPELINING", "8BITMIME", "CHUNKING")
BINARY = (*CHUNKING, "BINARYMIME")
FAST = ["--smtp-timeouts", "connect=2,greeting=3,helo=3,mail=3,rcpt=3,data=3,block=3,dot=3",
        "--min-backoff", "60", "--me", "relay.qrouter.test"]


def connect(server: CountingSink | ScriptedServer, **kwargs) -> SMTPClient:
    kwargs.setdefault("timeouts", QUICK)
    return SMTPClient.connect("127.0.0.1", server.port, helo_name=HELO, tls=TLS_NONE, **kwargs)


def outcomes(replies) -> list[tuple[str, str]]:
    return [(r.status, r.dsn) for r in replies]


def unstuffed(message: bytes) -> bytes:
    """What a server stores of a message sent with DATA: the wire after the 354, without the
    final dot line and the dot-stuffing."""
    wire = wire_data(message)[:-3]
    return (b"\r\n" + wire).replace(b"\r\n.", b"\r\n")[2:]


def send_one(extensions, message: bytes, **kwargs):
    """`message` to a sink offering `extensions`: the replies, what the sink stored, and the
    rounds of the conversation."""
    with CountingSink(extensions=extensions) as sink:
        client = connect(sink, **kwargs)
        replies = client.send("s@example.org", ["a@example.org"], message)
        client.close()
    return replies, sink.messages, sink.conversations[0]


# -- what goes on the wire ----------------------------------------------------------------------

MESSAGES = {
    "lf": b"Subject: x\n\nhello\n",
    "crlf": b"Subject: x\r\n\r\nhello\r\n",
    "dots": b"Subject: dots\n\n.\n..\n.x\nx.\n",
    "dot-first": b".\r\nrest",
    "no-final-newline": b"a\nlast",
    "8bit": "Subject: caf\u00e9\n\nna\u00efve \u00fcber\n".encode(),
    "smuggling-attempt": b"a\n.\nb\r\n.\rc\n",
    "empty": b"",
}


@pytest.mark.parametrize("name", MESSAGES)
def test_bdat_carries_exactly_what_data_delivers(name):
    message = MESSAGES[name]
    replies, [by_bdat], rounds = send_one(CHUNKING, message)
    _, [by_data], data_rounds = send_one(("PIPELINING", "8BITMIME"), message)
    assert outcomes(replies) == [(SENT, "2.0.0")]
    assert by_bdat.content == by_data.content == unstuffed(message)  # CRLF line ends, no stuffing, no dot
    assert rounds[1][-1] == f"BDAT {len(by_bdat.content)} LAST"  # the size is exact
    assert "DATA" not in [line for round_ in rounds for line in round_]
    assert data_rounds[1][-1] == "DATA"
    assert by_bdat.mail_options == by_data.mail_options == (["BODY=8BITMIME"] if name == "8bit" else [])


def test_a_large_message_goes_whole_in_one_chunk():
    message = b"".join(b"line %d\n.dot\n" % i for i in range(150_000))  # 2 MB, far more than one write
    replies, [stored], rounds = send_one(CHUNKING, message)
    assert outcomes(replies) == [(SENT, "2.0.0")]
    assert stored.content == unstuffed(message)
    assert rounds[1] == ["MAIL FROM:<s@example.org>", "RCPT TO:<a@example.org>", f"BDAT {len(stored.content)} LAST"]


BINARY_MESSAGE = b"Subject: bin\r\n\r\nNUL\x00 and bare\rCR\r\n" + b"x" * 2000 + b"\r\n\xff\xfe end\r\n"


def test_a_binary_body_goes_unchanged_as_binarymime_where_offered():
    replies, [stored], rounds = send_one(BINARY, BINARY_MESSAGE)
    assert outcomes(replies) == [(SENT, "2.0.0")]
    assert stored.content == BINARY_MESSAGE  # the 2000-octet line too: nothing wrapped
    assert stored.mail_options == ["BODY=BINARYMIME"]
    assert rounds[1][-1] == f"BDAT {len(BINARY_MESSAGE)} LAST"


@pytest.mark.parametrize("extensions", [CHUNKING, ("PIPELINING", "8BITMIME", "BINARYMIME")],
                         ids=["chunking-without-binarymime", "binarymime-without-chunking"])
def test_without_both_binarymime_and_chunking_a_binary_body_goes_as_today(extensions):
    replies, [stored], _ = send_one(extensions, BINARY_MESSAGE)
    assert outcomes(replies) == [(SENT, "2.0.0")]
    assert stored.content == unstuffed(BINARY_MESSAGE)  # the long line wrapped, as DATA sends it
    assert stored.content != BINARY_MESSAGE
    assert stored.mail_options == ["BODY=8BITMIME"]


def test_binarymime_only_for_a_body_that_needs_it():
    eight_bit = "Subject: x\n\n\u00fcber\n".encode()
    _, [text], _ = send_one(BINARY, b"Subject: x\n\nplain\n")
    _, [eight], _ = send_one(BINARY, eight_bit)
    assert text.mail_options == [] and eight.mail_options == ["BODY=8BITMIME"]
    assert eight.content == unstuffed(eight_bit)


# -- round trips ---------------------------------------------------------------------------------


def test_with_pipelining_a_message_costs_one_round_trip_and_data_two():
    with CountingSink(extensions=CHUNKING) as chunking, CountingSink() as plain:
        for sink in (chunking, plain):
            client = connect(sink)
            for recipient in ("a@example.org", "b@example.org"):
                replies = client.send("s@example.org", [recipient, "c@example.org"], b"x\n")
                assert outcomes(replies) == [(SENT, "2.0.0")] * 2
            client.close()
    envelope = ["MAIL FROM:<s@example.org>", "RCPT TO:<a@example.org>", "RCPT TO:<c@example.org>"]
    again = ["RSET", "MAIL FROM:<s@example.org>", "RCPT TO:<b@example.org>", "RCPT TO:<c@example.org>"]
    assert chunking.conversations == [[[f"EHLO {HELO}"], [*envelope, "BDAT 3 LAST"], [*again, "BDAT 3 LAST"],
                                       ["QUIT"]]]
    assert plain.conversations == [[[f"EHLO {HELO}"], [*envelope, "DATA"], ["."], [*again, "DATA"], ["."],
                                    ["QUIT"]]]
    assert [m.content for m in chunking.messages] == [m.content for m in plain.messages] == [b"x\r\n"] * 2


def test_without_pipelining_bdat_saves_the_round_trip_of_data():
    _, [stored], rounds = send_one(("CHUNKING",), b"x\n")
    assert rounds == [[f"EHLO {HELO}"], ["MAIL FROM:<s@example.org>"], ["RCPT TO:<a@example.org>"],
                      ["BDAT 3 LAST"], ["QUIT"]]
    assert stored.content == b"x\r\n"


# -- refusals ------------------------------------------------------------------------------------

REFUSE = {"a@example.org": "550 5.1.1 no such user a", "b@example.org": "550 5.1.1 no such user b"}


def test_all_recipients_refused_the_pipelined_chunk_is_refused_too_and_the_rcpt_replies_stand():
    with CountingSink(extensions=CHUNKING, refuse=REFUSE) as sink:
        client = connect(sink)
        replies = client.send("s@example.org", ["a@example.org", "b@example.org"], b"x\n")
        assert client.is_alive() and client.bdat_failure is None  # the server read the chunk: all is well
        later = client.send("s@example.org", ["c@example.org"], b"y\n")
        client.close()
    assert outcomes(replies) == [(BOUNCED, "5.1.1")] * 2
    assert [r.describe(client.peer) for r in replies] == [
        f"host {client.peer} said: 550 5.1.1 no such user {x} (in reply to RCPT TO command)" for x in "ab"]
    assert outcomes(later) == [(SENT, "2.0.0")]
    assert [m.rcpt_tos for m in sink.messages] == [["c@example.org"]]
    [rounds] = sink.conversations
    assert rounds[1][-1] == "BDAT 3 LAST" and rounds[2][0] == "RSET"  # the chunk went, then a clean start


def test_all_recipients_refused_without_pipelining_no_chunk_is_sent():
    with CountingSink(extensions=("CHUNKING",), refuse=REFUSE) as sink:
        client = connect(sink)
        replies = client.send("s@example.org", ["a@example.org", "b@example.org"], b"x\n")
        client.close()
    assert outcomes(replies) == [(BOUNCED, "5.1.1")] * 2
    assert not any(line.startswith("BDAT") for round_ in sink.conversations[0] for line in round_)


def test_some_recipients_refused_the_others_get_the_reply_to_bdat():
    with CountingSink(extensions=CHUNKING, refuse={"b@example.org": REFUSE["b@example.org"]}) as sink:
        client = connect(sink)
        replies = client.send("s@example.org", ["a@example.org", "b@example.org", "c@example.org"], b"x\n")
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0"), (BOUNCED, "5.1.1"), (SENT, "2.0.0")]
    assert replies[0].describe(client.peer) == (f"host {client.peer} said: 250 2.0.0 queued "
                                                "(in reply to BDAT command)")
    assert [m.rcpt_tos for m in sink.messages] == [["a@example.org", "c@example.org"]]


def test_a_message_refused_at_bdat_last_is_refused_not_a_bdat_failure():
    def spam_filter(peer: Peer) -> None:
        peer.greet(*CHUNKING)
        assert [peer.line() for _ in range(3)] == ["MAIL FROM:<s@example.org>", "RCPT TO:<a@example.org>",
                                                   "BDAT 9 LAST"]
        assert peer.read_some(9) == b"buy now\r\n"
        peer.send("250 2.1.0 ok", "250 2.1.5 ok", "554 5.7.1 refused as spam")
        peer.expect("QUIT")
        peer.send("221 2.0.0 bye")

    with ScriptedServer(spam_filter) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org"], b"buy now\n")
        assert client.is_alive() and client.bdat_failure is None
        client.close()
    assert outcomes(replies) == [(BOUNCED, "5.7.1")]


def test_lmtp_answers_each_accepted_recipient_after_bdat_last():
    with CountingSink(extensions=("CHUNKING",), refuse={"b@example.org": "550 5.1.1 no such user"},
                      lmtp=True) as sink:
        client = connect(sink, lmtp=True)
        replies = client.send("s@example.org", ["a@example.org", "b@example.org", "c@example.org"], b"x\n")
        client.close()
    assert outcomes(replies) == [(SENT, "2.0.0"), (BOUNCED, "5.1.1"), (SENT, "2.0.0")]
    assert [r.text for r in replies if r.ok] == ["<a@example.org> delivered", "<c@example.org> delivered"]
    assert sink.conversations[0][:2] == [[f"LHLO {HELO}"], ["MAIL FROM:<s@example.org>", "RCPT TO:<a@example.org>",
                                                            "RCPT TO:<b@example.org>", "RCPT TO:<c@example.org>",
                                                            "BDAT 3 LAST"]]


# -- a server that offers CHUNKING but fails BDAT ------------------------------------------------


@pytest.mark.parametrize("fails", ["500 5.5.1 command unrecognized", "502 5.5.2 not implemented", "hang up"])
def test_a_server_that_fails_bdat_is_named_and_takes_the_message_by_data(fails):
    message = b"Subject: t\n\n.dot\nbody\n"
    with CountingSink(extensions=CHUNKING, bdat_fails=fails) as sink:
        client = connect(sink)
        replies = client.send("s@example.org", ["a@example.org"], message)
        assert not client.is_open  # it read the message as commands, or hung up: nothing to trust
        again = connect(sink, chunking=False)
        later = again.send("s@example.org", ["a@example.org"], message)
        again.close()
    assert outcomes(replies) == [(DEFERRED, "4.5.1" if fails[:3] == "500" else "4.5.2" if fails[:3] == "502"
                                  else "4.4.2")]
    failure = client.bdat_failure
    assert failure is not None
    if fails == "hang up":
        assert failure.describe(client.peer).startswith(f"lost connection with {client.peer} while sending MAIL FROM")
    else:
        assert failure.describe(client.peer) == f"host {client.peer} said: {fails} (in reply to BDAT command)"
        assert replies[0].text == f"{failure.describe(client.peer)}, though it offers CHUNKING"
    assert outcomes(later) == [(SENT, "2.0.0")] and again.bdat_failure is None
    assert sink.conversations[1][1] == ["MAIL FROM:<s@example.org>", "RCPT TO:<a@example.org>", "DATA"]
    assert [m.content for m in sink.messages] == [unstuffed(message)]


def test_a_server_that_answers_the_envelope_and_hangs_up_at_bdat_fails_bdat():
    def hangs_up_at_bdat(peer: Peer) -> None:
        peer.greet(*CHUNKING)
        assert [peer.line() for _ in range(3)][-1] == "BDAT 3 LAST"
        peer.send("250 2.1.0 ok", "250 2.1.5 ok")

    with ScriptedServer(hangs_up_at_bdat) as server:
        client = connect(server)
        replies = client.send("s@example.org", ["a@example.org"], b"x\n")
    assert outcomes(replies) == [(DEFERRED, "4.4.2")]
    assert client.bdat_failure is not None
    assert client.bdat_failure.text.startswith(f"lost connection with {client.peer} while sending BDAT LAST "
                                               "-- message may be sent more than once")


def test_losing_a_connection_that_has_taken_bdat_is_not_blamed_on_bdat():
    def second_message_lost(peer: Peer) -> None:
        peer.greet(*CHUNKING)
        assert [peer.line() for _ in range(3)][-1] == "BDAT 3 LAST"
        peer.read_some(3)
        peer.send("250 2.1.0 ok", "250 2.1.5 ok", "250 2.0.0 queued")
        assert peer.line() == "RSET"  # the next message: the server goes away

    with ScriptedServer(second_message_lost) as server:
        client = connect(server)
        first = client.send("s@example.org", ["a@example.org"], b"x\n")
        second = client.send("s@example.org", ["a@example.org"], b"y\n")
    assert outcomes(first) == [(SENT, "2.0.0")] and outcomes(second) == [(DEFERRED, "4.4.2")]
    assert client.bdat_failure is None


def test_a_server_that_refuses_mail_and_hangs_up_is_not_blamed_on_bdat():
    def refuses_and_hangs_up(peer: Peer) -> None:
        peer.greet(*CHUNKING)
        peer.line()
        peer.send("550 5.7.1 you are not welcome")

    with ScriptedServer(refuses_and_hangs_up) as server:
        client = connect(server)
        client.send("s@example.org", ["a@example.org"], b"x\n")
    assert client.bdat_failure is None


def test_a_server_slow_to_answer_bdat_is_not_blamed_on_bdat():
    def slow(peer: Peer) -> None:
        peer.greet(*CHUNKING)
        peer.stall()

    with ScriptedServer(slow) as server:
        client = connect(server, timeouts=replace(QUICK, mail=0.4, rcpt=0.4, dot=0.4))
        replies = client.send("s@example.org", ["a@example.org"], b"x\n")
    assert outcomes(replies) == [(DEFERRED, "4.4.2")] and "timed out" in replies[0].text
    assert client.bdat_failure is None


# -- through the daemon --------------------------------------------------------------------------


def test_the_daemon_relays_with_bdat_byte_for_byte(daemons):
    body = b"Subject: relay\n\n.leading dot\n\xc3\xbcber\nNUL\x00\n"
    with CountingSink(extensions=BINARY) as sink:
        daemon = daemons("--relayhost", f"127.0.0.1:{sink.port}", *FAST)
        queue_id = Spool(daemon.spool).enqueue("s@example.org", ["a@example.org", "b@example.net"], body)
        wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery")
    [received] = sink.messages
    assert received.content == b"Subject: relay\r\n\r\n.leading dot\r\n\xc3\xbcber\r\nNUL\x00\r\n"
    assert received.mail_options == ["BODY=BINARYMIME"]
    assert received.rcpt_tos == ["a@example.org", "b@example.net"]
    envelope = sink.conversations[0][1]
    assert envelope[-1] == f"BDAT {len(received.content)} LAST" and len(envelope) == 4  # MAIL, 2 RCPT, BDAT
    line = next(ln for ln in daemon.log().splitlines() if "to=<a@example.org>" in ln)
    assert "dsn=2.0.0, status=sent (250 2.0.0 queued)" in line
    assert "BDAT" not in daemon.log()  # nothing to warn about


@pytest.mark.parametrize("fails", ["500 5.5.1 command unrecognized", "hang up"])
def test_the_daemon_delivers_by_data_at_once_to_a_server_that_fails_bdat_and_says_so_once(daemons, fails):
    with CountingSink(extensions=CHUNKING, bdat_fails=fails) as sink:
        # no connection kept: the second message needs a new one, which must remember the failure
        daemon = daemons("--relayhost", f"127.0.0.1:{sink.port}", "--smtp-idle-timeout", "0", *FAST, workers=1)
        spool = Spool(daemon.spool)
        first = spool.enqueue("s@example.org", ["a@example.org"], b"Subject: 1\r\n\r\none\r\n")
        wait_for(lambda: f"{first}: removed" in daemon.log(), what="the first delivery")
        second = spool.enqueue("s@example.org", ["b@example.org"], b"Subject: 2\r\n\r\ntwo\r\n")
        wait_for(lambda: f"{second}: removed" in daemon.log(), what="the second delivery")
    assert [m.content for m in sink.messages] == [b"Subject: 1\r\n\r\none\r\n", b"Subject: 2\r\n\r\ntwo\r\n"]
    assert [conversation[1][:3] for conversation in sink.conversations] == [  # one connection each
        ["MAIL FROM:<s@example.org>", "RCPT TO:<a@example.org>", "BDAT 19 LAST"],
        ["MAIL FROM:<s@example.org>", "RCPT TO:<a@example.org>", "DATA"],
        ["MAIL FROM:<s@example.org>", "RCPT TO:<b@example.org>", "DATA"]]
    log = daemon.log()
    peer = f"127.0.0.1[127.0.0.1]:{sink.port}"
    [warning] = [line for line in log.splitlines() if "fails BDAT" in line]
    assert f"{first}: host {peer} offers CHUNKING but fails BDAT (" in warning
    assert warning.endswith("); using DATA with it from now on")
    assert (f"said: {fails} (in reply to BDAT command)" if fails != "hang up" else "lost connection") in warning
    for queue_id, recipient in ((first, "a@example.org"), (second, "b@example.org")):
        [sent] = [ln for ln in log.splitlines() if f"{queue_id}: to=<{recipient}>" in ln]
        assert sent.endswith("status=sent (250 2.0.0 queued), attempts=1")
