"""router.front.aiosmtpd.QueueHandler: a real aiosmtpd Controller on loopback queueing into the spool,
smtplib as the client, the real daemon delivering into Maildirs (or to a real aiosmtpd next hop
when the envelope is what is being looked at)."""

from __future__ import annotations

import logging
import os
import re
import smtplib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib.metadata import requires

import pytest
from aiosmtpd.controller import Controller

from router.front.aiosmtpd import QueueHandler
from router.spool import Spool
from tests.daemon import ROOT, after_trace, message_in, read_only, wait_for
from tests.smtp_servers import AioServer, free_port
from tests.unix_users import script

QUEUED = re.compile(rb"2\.0\.0 Queued as ([0-9A-F]{13}-[0-9A-F]+-[0-9A-F]+)")
FAST = ["--smtp-timeouts", "connect=2,greeting=3,helo=3,mail=3,rcpt=3,data=3,block=3,dot=3",
        "--min-backoff", "60", "--me", "relay.qrouter.test"]

# As on the wire: CRLF line ends, 8-bit in a header and the body, lines starting with dots (one of
# them a lone dot, which smtplib stuffs and aiosmtpd unstuffs), trailing white space.
EIGHT_BIT = (b"From: J\xc3\xb6rg <joerg@example.org>\r\n"
             b"Subject: gr\xc3\xbc\xc3\x9fe\r\n"
             b"\r\n"
             b".\r\n"
             b"..two dots\r\n"
             b".one dot\r\n"
             b"K\xc3\xb6ln, and every high byte: " + bytes(range(0x80, 0x100)) + b"\r\n"
             b"trailing white space \t \r\n")


@contextmanager
def front(spool, **handler_kwargs):
    """aiosmtpd with a QueueHandler for `spool` on 127.0.0.1, for the length of a `with`; gives the port."""
    port = free_port()
    controller = Controller(QueueHandler(spool, **handler_kwargs), hostname="127.0.0.1", port=port,
                            server_hostname="front.qrouter.test")
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def send(port: int, sender: str, recipients: list[str], message: bytes) -> tuple[int, bytes, dict]:
    """One transaction; the reply to the end of data, and the refused recipients."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example")
        client.mail(sender, ["BODY=8BITMIME"] if not message.isascii() else [])
        refused = {}
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            if code != 250:
                refused[rcpt] = (code, text)
        code, text = client.data(message)
    return code, text, refused


def queue_id(reply: bytes) -> str:
    match = QUEUED.fullmatch(reply)
    assert match, reply
    return match.group(1).decode()


def test_messages_arrive_byte_for_byte(daemons):
    daemon = daemons()
    messages = {"eight-bit": EIGHT_BIT,
                "plain": b"Subject: plain\r\n\r\nhello\r\n",
                "empty-body": b"Subject: nothing follows\r\n\r\n",
                "long": b"Subject: long\r\n\r\n" + b"0123456789abcdef" * 60 + b"\r\n" + b"line\r\n" * 50_000}
    ids = {}
    with front(daemon.spool) as port:
        for name, message in messages.items():
            code, reply, refused = send(port, "sender@example.org", [f"{name}@one.example"], message)
            assert (code, refused) == (250, {})
            ids[name] = queue_id(reply)
    for name, message in messages.items():
        [delivered] = wait_for(lambda name=name: daemon.delivered(f"one.example/{name}"), what=name)
        trace, handed_in = after_trace(message_in(delivered))
        assert handed_in == message, name
        assert re.fullmatch(rf"Received: from client\.example \(\[127\.0\.0\.1\]\) by front\.qrouter\.test "
                            rf"\(qrouter\) with ESMTP id {ids[name]} for <{name}@one\.example>; .+", trace), trace
        wait_for(lambda name=name: f"{ids[name]}: removed" in daemon.log(), what=f"{name} removed")
    assert len(set(ids.values())) == len(messages)


def test_envelope_null_sender_and_recipients_in_order(daemons):
    with AioServer() as sink:
        daemon = daemons("--relayhost", f"127.0.0.1:{sink.port}", *FAST)
        recipients = ["c@three.example", "a@one.example", "b@two.example", "a@one.example.net"]
        with front(daemon.spool) as port:
            code, reply, refused = send(port, "<>", recipients, EIGHT_BIT)
            assert (code, refused) == (250, {})
            code, _, _ = send(port, "bounce-me@example.org", ["x@one.example"], b"Subject: 2\r\n\r\nsecond\r\n")
            assert code == 250
        wait_for(lambda: len(sink.handler.messages) == 2, what="both messages at the next hop")
    first, second = sorted(sink.handler.messages, key=lambda m: m.mail_from != "<>")  # delivered side by side
    assert (first.mail_from, first.rcpt_tos, after_trace(first.content)[1]) == ("<>", recipients, EIGHT_BIT)
    assert " for <" not in after_trace(first.content)[0]  # the for-part would name one recipient to all
    assert (second.mail_from, second.rcpt_tos) == ("bounce-me@example.org", ["x@one.example"])
    wait_for(lambda: f"{queue_id(reply)}: removed" in daemon.log(), what="the first message removed")


def test_bad_addresses_are_refused_one_by_one(daemons):
    daemon = daemons()
    with front(daemon.spool) as port, smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example")
        code, text = client.mail("<postmaster>")
        assert (code, text[:5]) == (553, b"5.1.7")
        assert client.mail("s@example.org")[0] == 250
        assert client.rcpt("<root>") == (553, b"5.1.3 address 'root' has no local part and domain (user@domain)")
        assert client.rcpt("ok@one.example")[0] == 250
        assert client.rcpt("<a..b@one.example>")[0] == 553
        code, reply = client.data(b"Subject: partly\r\n\r\nfor ok only\r\n")
        assert code == 250
    [delivered] = wait_for(lambda: daemon.delivered(), what="the one delivery")
    assert str(delivered.parent.parent.relative_to(daemon.mail)) == "one.example/ok"
    wait_for(lambda: f"{queue_id(reply)}: removed" in daemon.log(), what="removal")
    assert daemon.delivered() == [delivered]


def test_many_sessions_at_once_each_queued_once(daemons):
    daemon = daemons(workers=3)
    with front(daemon.spool) as port, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: send(port, f"s{n}@example.org", [f"u{n}@one.example"],
                                                f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()), range(40)))
    assert all(code == 250 for code, _, _ in results)
    assert len({queue_id(reply) for _, reply, _ in results}) == 40
    wait_for(lambda: len(daemon.delivered()) == 40, what="40 deliveries")
    for n in range(40):
        assert [after_trace(message_in(p))[1] for p in daemon.delivered(f"one.example/u{n}")] == [
            f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()]


def test_an_unwritable_spool_answers_451_and_the_client_can_send_again(daemons):
    daemon = daemons(start=False)
    Spool(daemon.spool).create()
    message = b"Subject: try again\r\n\r\nkept by the client\r\n"
    with front(daemon.spool) as port:
        with read_only(daemon.spool):
            code, reply, refused = send(port, "s@example.org", ["u@one.example", "v@two.example"], message)
            assert refused == {}
            assert code == 451
            assert reply.startswith(b"4.3.0 cannot queue into ") and b"Read-only file system" in reply
            assert daemon.files("incoming") == daemon.files("tmp") == []
        code, reply, _ = send(port, "s@example.org", ["u@one.example", "v@two.example"], message)
        assert code == 250
    daemon.start()
    wait_for(lambda: len(daemon.delivered()) == 2, what="two deliveries")
    assert [after_trace(message_in(p))[1] for p in daemon.delivered()] == [message, message]
    wait_for(lambda: f"{queue_id(reply)}: removed" in daemon.log(), what="removal")


def test_a_missing_spool_answers_451(tmp_path):
    with front(tmp_path / "no-such-spool") as port:
        code, reply, _ = send(port, "s@example.org", ["u@one.example"], b"x\r\n")
    assert code == 451 and b"No such file or directory" in reply
    assert not (tmp_path / "no-such-spool").exists()


def test_without_aiosmtpd_the_import_says_what_to_install():
    code = "import sys; sys.modules['aiosmtpd'] = None; import router.front.aiosmtpd"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=30)
    assert result.returncode == 1
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("ImportError: router.front.aiosmtpd needs the aiosmtpd package")
    assert "pip install aiosmtpd" in last
    # ...and installing qrouter does not pull it in: it is only among the test extras.
    runtime = [r for r in requires("qpsmtpd-router") or [] if "extra ==" not in r]
    assert runtime and not any(r.lower().startswith("aiosmtpd") for r in runtime)


def test_a_message_over_the_size_limit_is_refused_at_the_end_of_data(tmp_path):
    spool = tmp_path / "spool"
    Spool(spool).create()
    with front(spool, size_limit=1000) as port:
        code, reply, refused = send(port, "s@example.org", ["u@one.example"], (b"x" * 98 + b"\r\n") * 20)
        assert (code, refused) == (552, {})
        assert reply.startswith(b"5.3.4 ") and b"larger than message-size-limit (1000 bytes)" in reply
        assert sorted(os.listdir(spool / "incoming")) == sorted(os.listdir(spool / "tmp")) == []
        # the limit is on the message as queued, with the Received: field (some 170 bytes here)
        code, reply, _ = send(port, "s@example.org", ["u@one.example"], (b"x" * 98 + b"\r\n") * 8)
        assert code == 250
    [name] = os.listdir(spool / "incoming")
    assert name == queue_id(reply)


# -- recipient verification at RCPT -----------------------------------------------------------

@pytest.fixture
def verifying(daemons, tmp_path, world_dir):
    """A daemon delivering local.test through aliases (alice only), refusing blocked.test by a
    queue/error rule, and everything else into Maildirs."""
    (tmp_path / "aliases").write_text("root nobody\nalice nobody\n")
    (tmp_path / "transports").write_text(f"local.test {script(world_dir, 'agent', 'cat >/dev/null')}\n"
                                         "blocked.test queue/error 5.7.1 we take no mail for blocked.test\n")
    return daemons("--transports", str(tmp_path / "transports"), "--aliases", str(tmp_path / "aliases"))


def test_verify_refuses_at_rcpt_what_qrouter_would_bounce_and_logs_each_refusal(verifying, caplog):
    caplog.set_level(logging.INFO, logger="qrouter")
    with front(verifying.spool, verify=True) as port:
        recipients = ["carol@local.test", "x@blocked.test", "alice@local.test", "u@one.example"]
        code, reply, refused = send(port, "victim@innocent.test", recipients, b"Subject: v\r\n\r\nv\r\n")
    assert refused == {"carol@local.test": (550, b"5.1.1 no alias for local part 'carol' in "
                                                 + str(verifying.tmp / "aliases").encode()),
                       "x@blocked.test": (550, b"5.7.1 we take no mail for blocked.test")}
    assert code == 250
    wait_for(lambda: f"{queue_id(reply)}: removed" in verifying.log(), what="the delivery of the accepted two")
    assert "carol" not in verifying.log() and "blocked.test" not in verifying.log()
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused recipient")]
    assert refusals == ["refused recipient <carol@local.test>: 550 5.1.1 no alias for local part 'carol' in "
                        f"{verifying.tmp / 'aliases'}",
                        "refused recipient <x@blocked.test>: 550 5.7.1 we take no mail for blocked.test"]


@pytest.mark.parametrize(("verify_fail", "expected"), [("open", 250), ("closed", 451)])
def test_verify_with_the_daemon_stopped_fails_open_or_closed(verifying, caplog, verify_fail, expected):
    assert verifying.stop() == 0
    with front(verifying.spool, verify=True, verify_fail=verify_fail) as port, \
            smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail("s@example.org")
        code, text = client.rcpt("carol@local.test")
    assert code == expected
    if verify_fail == "closed":
        assert text == b"4.3.0 Cannot verify the recipient now, try again later"
    assert f"cannot verify recipient <carol@local.test>: cannot reach the daemon at {verifying.spool}/status.sock" \
        in caplog.text


def test_without_verify_the_daemon_is_not_asked(verifying):
    with front(verifying.spool) as port:
        code, _, refused = send(port, "s@example.org", ["carol@local.test"], b"Subject: v\r\n\r\nv\r\n")
    assert (code, refused) == (250, {})
    assert verifying.status()["verify"]["refused"] == 0
