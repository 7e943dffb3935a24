"""`qrouter drain --to PEER`: a node hands its whole queue to a peer qrouter and takes no new mail.

Real daemons with spools of their own: the draining node, and the peer whose front door is the
aiosmtpd queue handler (router/front/aiosmtpd.py, with DSN) and whose next hop is an aiosmtpd
sink on loopback. The draining node holds its mail back (a `queue/retry` transport) until the
drain, so that every message is in its queue when the drain begins.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from router.front.aiosmtpd import QueueController, QueueHandler
from router.spool import Spool, read_queue_file
from router.spool.drain import Drain, read_drain, write_drain
from router.spool.queue_file import MAX_OVERHEAD, QueueFile, Recipient, parse
from router.spool.queue_id import arrival_of, new_queue_id
from tests.daemon import qrouter, wait_for
from tests.qpsmtpd_server import smtp_data, swaks
from tests.smtp_servers import CountingSink, Recorder, free_port

MESSAGES = 1000
WITH_DSN = range(0, MESSAGES, 10)  # every tenth message asks for DSN
HELD_BACK = ["--default-transport", "queue/retry 4.4.0 held back until the drain", "--min-backoff", "3600",
             "--max-backoff", "3600"]
LATE = "late@example.org"  # the sink says "later" for it, so the peer's max-age decides
SUBJECT = re.compile(rb"Subject: (drain-\d+|late)\r?\n")


class DSNRecorder(Recorder):
    """A sink that keeps the DSN parameters each message came with (router/front/aiosmtpd.py
    DSNServer takes them off the commands)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(extensions=["DSN"], **kwargs)
        self.dsn: dict[bytes, list[tuple[dict[str, str], list[dict[str, str]]]]] = {}

    async def handle_DATA(self, server, session, envelope) -> str:
        subject = SUBJECT.search(envelope.original_content)
        self.dsn.setdefault(subject[1] if subject else b"?", []).append(
            (dict(getattr(envelope, "dsn", {})), list(getattr(envelope, "rcpt_dsn", []))))
        return await super().handle_DATA(server, session, envelope)


class Gate(QueueHandler):
    """The peer's front door, which queues the first `take` messages and holds every later one at
    the end of its data until `release()`: the draining node is killed while the gate is shut, so
    the drain is part-way however fast this machine is, and the held sessions are in flight."""

    def __init__(self, queue_dir, take: int, **kwargs) -> None:
        super().__init__(queue_dir, **kwargs)
        self.take = take
        self.taken = 0
        self.waiting = 0
        self.opened = threading.Event()

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.taken >= self.take:
            self.waiting += 1
            while not self.opened.is_set():
                await asyncio.sleep(0.05)
        self.taken += 1
        return await super().handle_DATA(server, session, envelope)

    def release(self) -> None:
        self.opened.set()


@contextmanager
def serving(handler, port: int):
    controller = QueueController(handler, hostname="127.0.0.1", port=port, server_hostname="peer.qrouter.test")
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def queue_messages(spool_dir) -> None:
    """MESSAGES messages, every tenth with DSN parameters, and one that arrived two days ago."""
    spool = Spool(spool_dir)
    for i in range(MESSAGES):
        message = f"Subject: drain-{i}\r\n\r\nmessage {i}\r\n".encode()
        if i in WITH_DSN:
            rcpt = Recipient(f"user{i}@example.org", notify="SUCCESS,FAILURE", orcpt=f"rfc822;orig+{i}@example.org")
            spool.enqueue("sender@example.org", [rcpt], message, envid=f"env+{i}=x y", ret="HDRS")
        else:
            spool.enqueue("sender@example.org", [f"user{i}@example.org"], message)
    queue_id = new_queue_id()
    late = QueueFile(queue_id, arrival_of(queue_id) - 2 * 86400, "sender@example.org", [Recipient(LATE)],
                     b"Subject: late\r\n\r\ntwo days old\r\n")
    spool.write(late, "incoming")
    spool.close()


def delivered(sink: DSNRecorder) -> Counter:
    return Counter(SUBJECT.search(m.content)[1].decode() for m in sink.messages)


def test_drain_hands_every_message_to_the_peer_with_its_envelope_and_arrival(daemons):
    sink = DSNRecorder(rcpt={LATE: "451 4.3.0 come back later"})
    sink_port, front_port = free_port(), free_port()
    controller = QueueController(sink, hostname="127.0.0.1", port=sink_port)
    controller.start()
    peer = daemons("--relayhost", f"127.0.0.1:{sink_port}", "--max-age", "1", "--cluster-peers", "127.0.0.1",
                   home="peer")
    node = daemons(*HELD_BACK, workers=2, home="node")
    gate = Gate(peer.spool, MESSAGES // 4, peers=["127.0.0.1"])
    try:
        with serving(gate, front_port):
            queue_messages(node.spool)
            wait_for(lambda: len(node.files("deferred")) == MESSAGES + 1, timeout=120, what="all held back")

            result = qrouter("drain", "--to", f"127.0.0.1:{front_port}", "--queue-dir", str(node.spool), check=True)
            assert b"draining to 127.0.0.1:" in result.stdout

            # The node takes no new mail, by any front door.
            refused = qrouter("enqueue", "-f", "a@example.org", "b@example.org", "--queue-dir", str(node.spool),
                              stdin=b"Subject: new\r\n\r\nnew\r\n")
            assert refused.returncode == 75, refused
            assert b"4.3.2 this node is draining its queue to 127.0.0.1:" in refused.stderr
            refused = qrouter("sendmail", "--queue-dir", str(node.spool), "b@example.org",
                              stdin=b"Subject: new\n\nnew\n")
            assert refused.returncode == 75 and b"4.3.2 this node is draining" in refused.stderr, refused
            node_front = free_port()
            with serving(QueueHandler(node.spool), node_front), smtplib.SMTP("127.0.0.1", node_front) as client:
                client.ehlo("client.example")
                code, text = client.mail("a@example.org")
                assert (code, text[:6]) == (421, b"4.3.2 "), (code, text)

            # kill -9 part-way, then a restart resumes the drain from the mark in the spool.
            wait_for(lambda: gate.waiting, timeout=120, what="a quarter at the peer and the gate shut")
            workers = node.worker_pids()
            node.kill()
            wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), timeout=10,
                     what="the workers to die with the supervisor")
            in_flight = len(node.files("active"))
            left = sum(len(node.files(queue)) for queue in ("incoming", "active", "deferred"))
            assert left >= MESSAGES // 2, f"the node holds {left} messages with the peer's gate shut"
            gate.release()
            node.start()
            status = qrouter("status", "--queue-dir", str(node.spool), check=True).stdout.decode()
            assert re.search(r"draining to 127\.0\.0\.1:\d+ for .*: (\d+ recipient\(s\) sent there, \d+ message\(s\) "
                             r"left; new mail is refused|done, \d+ recipient\(s\) sent there and nothing left to send; "
                             r"new mail is refused until qrouter drain --cancel)", status), status

            # every message, counted by its subject: a duplicate from the kill must not stand in for
            # one the peer has not passed on yet
            wait_for(lambda: len(delivered(sink)) == MESSAGES and not (node.files("incoming") or node.files("active")
                                                                       or node.files("deferred")),
                     timeout=300, what="every message at the sink and the node empty")
            wait_for(lambda: re.search(rf"to=<{LATE}>.*status=expired", peer.log()), timeout=60,
                     what="the old message expired at the peer")
    finally:
        controller.stop()

    counts = delivered(sink)
    assert set(counts) == {f"drain-{i}" for i in range(MESSAGES)}, "a message was lost"
    twice = sum(n - 1 for n in counts.values())
    assert twice <= in_flight, f"{twice} delivered twice, {in_flight} were in flight at the kill"
    for i in WITH_DSN:
        envelope, recipients = sink.dsn[f"drain-{i}".encode()][0]
        assert envelope == {"RET": "HDRS", "ENVID": f"env+{i}=x y"}
        assert recipients == [{"NOTIFY": "SUCCESS,FAILURE", "ORCPT": f"rfc822;orig+{i}@example.org"}]
    assert sink.dsn[b"drain-1"][0] == ({}, [{}])
    # The message two days old had a day left on the node (max-age 5); the peer (max-age 1)
    # counts from its first arrival and expires it at its first "later".
    assert re.search(rf"to=<{LATE}>.*status=expired", peer.log())
    assert not re.search(rf"to=<{LATE}>.*status=expired", node.log())

    qrouter("drain", "--cancel", "--queue-dir", str(node.spool), check=True)
    taken = qrouter("enqueue", "-f", "a@example.org", "b@example.org", "--queue-dir", str(node.spool),
                    stdin=b"Subject: after\r\n\r\nafter\r\n")
    assert taken.returncode == 0, taken


def subjects(*sinks: CountingSink) -> Counter:
    return Counter(SUBJECT.search(m.content)[1].decode() for sink in sinks for m in sink.messages)


@pytest.mark.parametrize("change", ["drain", "reload"])
def test_what_waits_for_a_slow_destination_when_the_policy_changes_keeps_to_the_new_ones_limit(daemons, tmp_path,
                                                                                                 change):
    """A few hundred messages wait in the dispatcher for a slow destination (ten connections, one
    round trip a third of a second) when the drain begins, or when a reload routes them to another
    (the transports file changed, then SIGHUP); the peer's rule says two connections. Routed
    again, they count against the peer: it never has more than two at once, and every message
    arrives once, at the peer or (those in flight at the change) at the slow destination."""
    count = 300
    with CountingSink(delay=0.3) as slow, CountingSink() as peer:
        rules = tmp_path / "destinations"
        rules.write_text(f"smtp:127.0.0.1:{slow.port} concurrency=10 initial-window=10\n"
                         f"smtp:127.0.0.1:{peer.port} concurrency=2\n")
        transports = tmp_path / "transports"
        transports.write_text(f"example.org 127.0.0.1:{slow.port}\n")
        node = daemons("--transports", str(transports), "--destinations", str(rules))
        spool = Spool(node.spool)
        for i in range(count):
            spool.enqueue("sender@example.org", [f"user{i}@example.org"], f"Subject: drain-{i}\r\n\r\n{i}\r\n".encode())
        spool.close()
        wait_for(lambda: slow.open >= 5, what="the slow destination busy")
        if change == "drain":
            qrouter("drain", "--to", f"127.0.0.1:{peer.port}", "--queue-dir", str(node.spool), check=True)
        else:
            transports.write_text(f"example.org 127.0.0.1:{peer.port}\n")
            node.signal(signal.SIGHUP)
        wait_for(lambda: sum(subjects(slow, peer).values()) >= count and not node.files("active"), timeout=120,
                 what="every message delivered")
        assert len(slow.messages) < count // 2, "most of the mail should have waited for the slow destination"
        assert peer.most <= 2, f"{peer.most} connections to the peer at once, its limit is 2"
        assert subjects(slow, peer) == Counter({f"drain-{i}": 1 for i in range(count)})


def assert_arrivals(spool: Path, old: float) -> None:
    """The message from a peer was queued with the arrival its field gave, the one from a stranger
    with its own; neither keeps the field."""
    arrivals = {}
    for path in (spool / "incoming").iterdir():
        queued = parse(read_queue_file(str(path), (1 << 20) + MAX_OVERHEAD), str(path))
        assert b"X-Qrouter-Arrival" not in queued.message
        arrivals[queued.recipients[0].address] = queued.arrival
    assert abs(arrivals["peer@example.org"] - old) < 1e-3
    assert arrivals["stranger@example.org"] > old + 2 * 86400


def test_arrival_field_is_believed_only_from_peers_and_always_taken_out(tmp_path):
    spool_dir = tmp_path / "spool"
    Spool(spool_dir).create()
    old = time.time() - 3 * 86400
    message = f"X-Qrouter-Arrival: {old:.6f}; id=0643A8B2C1D4E-1A2B-1\r\nSubject: hi\r\n\r\nbody\r\n".encode()
    for name, peers in (("peer", ["127.0.0.1"]), ("stranger", ["192.0.2.1"])):
        port = free_port()
        with serving(QueueHandler(spool_dir, peers=peers), port), smtplib.SMTP("127.0.0.1", port) as client:
            client.ehlo("client.example")
            assert client.has_extn("dsn")
            client.sendmail("a@example.org", [f"{name}@example.org"], message)
    assert_arrivals(spool_dir, old)


def test_drain_needs_one_mail_server_and_the_daemon(daemons, tmp_path):
    node = daemons(*HELD_BACK)
    bad = qrouter("drain", "--to", "a.example,b.example", "--queue-dir", str(node.spool))
    assert bad.returncode == 1 and b"drain --to takes one mail server" in bad.stderr, bad
    assert qrouter("drain", "--queue-dir", str(node.spool)).returncode == 64
    assert not (node.spool / "drain").exists()
    none = qrouter("drain", "--cancel", "--queue-dir", str(node.spool))
    assert none.returncode == 1 and b"no drain in progress" in none.stderr, none
    qrouter("drain", "--to", "127.0.0.1:2525", "--queue-dir", str(node.spool), check=True)
    other = qrouter("drain", "--to", "127.0.0.2:2525", "--queue-dir", str(node.spool))
    assert other.returncode == 1 and b"already draining to 127.0.0.1:2525; qrouter drain --cancel first" in \
        other.stderr, other
    qrouter("drain", "--cancel", "--queue-dir", str(node.spool), check=True)
    assert not (node.spool / "drain").exists()
    node.stop()
    gone = qrouter("drain", "--to", "127.0.0.1:2525", "--queue-dir", str(node.spool))
    assert gone.returncode == 75 and b"a drain needs the running daemon" in gone.stderr, gone


def test_a_drain_mark_edited_into_nonsense_keeps_the_mail_here_and_says_so(daemons, tmp_path):
    """A mark naming no single mail server (edited by hand): the daemon says so at its start and
    routes as before; nothing goes anywhere it was not meant to, and --cancel ends it."""
    spool = tmp_path / "spool"
    Spool(spool).create()
    write_drain(spool, Drain("a.example,b.example", time.time()))
    node = daemons(*HELD_BACK, "--queue-dir", str(spool))
    wait_for(lambda: "mail stays queued here until qrouter drain --cancel" in node.log(), what="the complaint")
    assert "drain --to takes one mail server" in node.log()
    qrouter("drain", "--cancel", "--queue-dir", str(spool), check=True)
    assert not (spool / "drain").exists()


def test_qpsmtpd_refuses_while_draining_and_believes_the_arrival_of_peers_only(tmp_path, qpsmtpd):
    spool = tmp_path / "spool"
    Spool(spool).create()
    old = time.time() - 3 * 86400
    data = tmp_path / "message.smtp"
    data.write_bytes(smtp_data(f"X-Qrouter-Arrival: {old:.6f}; id=0643A8B2C1D4E-1A2B-1\r\nSubject: hi\r\n\r\n"
                               "body\r\n".encode()))
    for name, peers in (("peer", "127.0.0.1"), ("stranger", "192.0.2.1")):
        server = qpsmtpd(spool, "cluster-peers", peers, own_daemon=False)
        result = swaks(server.port, "--from", "a@example.org", "--to", f"{name}@example.org", data=data)
        assert result.returncode == 0, result.stdout.decode(errors="replace")
        server.stop()
    assert_arrivals(spool, old)

    write_drain(spool, Drain("peer.example:2525", time.time()))
    server = qpsmtpd(spool, own_daemon=False)
    result = swaks(server.port, "--from", "a@example.org", "--to", "u@example.org", data=data)
    out = result.stdout.decode(errors="replace")
    assert "<** 421 4.3.2 this node is draining its queue to peer.example:2525" in out, out
    assert len(list((spool / "incoming").iterdir())) == 2


def status_text(spool: Path) -> str:
    return qrouter("status", "--queue-dir", str(spool), check=True).stdout.decode()


def test_held_mail_stays_says_so_and_goes_to_the_peer_once_released(daemons, tmp_path):
    """hold/ is not drained: the drain's answer and `qrouter status` say how many messages stay
    there and how to send them on; the drain is done when nothing but them is left, and one
    released meanwhile goes to the peer."""
    with CountingSink() as peer:
        node = daemons(*HELD_BACK)
        spool = Spool(node.spool)
        ids = [spool.enqueue("sender@example.org", [f"user{i}@example.org"],
                             f"Subject: drain-{i}\r\n\r\n{i}\r\n".encode()) for i in range(5)]
        spool.close()
        wait_for(lambda: len(node.files("deferred")) == 5, what="all held back")
        node.wait_idle()  # the attempts' reports in: a message still in hand is held only after its attempt
        qrouter("queue", "hold", *ids[:3], "--queue-dir", str(node.spool), check=True)
        assert node.files("hold") == sorted(ids[:3])

        answer = qrouter("drain", "--to", f"127.0.0.1:{peer.port}", "--queue-dir", str(node.spool), check=True)
        assert ("3 message(s) in hold/ stay here: qrouter queue release sends them to the peer"
                in answer.stdout.decode()), answer.stdout
        # the count follows the workers' reports, which come after the files leave active/
        wait_for(lambda: len(peer.messages) == 2 and not (node.files("deferred") or node.files("active"))
                 and drain_sent(node) == 2, what="the mail not held at the peer")
        status = status_text(node.spool)
        assert re.search(r"draining to 127\.0\.0\.1:\d+ for .*: done, 2 recipient\(s\) sent there and nothing left "
                         r"to send but held mail; new mail is refused until qrouter drain --cancel", status), status
        assert "3 message(s) in hold/ stay here: qrouter queue release sends them to the peer" in status, status

        qrouter("queue", "release", ids[0], "--queue-dir", str(node.spool), check=True)
        wait_for(lambda: len(peer.messages) == 3 and not (node.files("incoming") or node.files("active")),
                 what="the released message at the peer")
        assert subjects(peer) == Counter({"drain-0": 1, "drain-3": 1, "drain-4": 1})
        assert re.search(rf"{ids[0]}: to=<user0@example\.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{peer.port}, .*"
                         r"status=sent", node.log()), node.log()
        assert "2 message(s) in hold/ stay here" in status_text(node.spool)
        assert node.files("hold") == sorted(ids[1:3])


def drain_sent(node) -> int:
    return node.status()["drain"]["sent"]


def test_the_count_sent_to_the_peer_outlives_a_restart_and_a_kill(daemons, tmp_path):
    """The recipients sent to the peer are counted across restarts: recorded in the mark when the
    daemon stops (exactly) and every few seconds while it runs (after a kill -9, up to that)."""
    count = 80
    with CountingSink(delay=0.1) as peer:  # one message about every 0.2 s: the drain lasts well past a record
        rules = tmp_path / "destinations"
        rules.write_text(f"smtp:127.0.0.1:{peer.port} concurrency=1\n")
        node = daemons(*HELD_BACK, "--destinations", str(rules))
        spool = Spool(node.spool)
        for i in range(count):
            spool.enqueue("sender@example.org", [f"user{i}@example.org"], f"Subject: drain-{i}\r\n\r\n{i}\r\n".encode())
        spool.close()
        wait_for(lambda: len(node.files("deferred")) == count, what="all held back")
        qrouter("drain", "--to", f"127.0.0.1:{peer.port}", "--queue-dir", str(node.spool), check=True)

        wait_for(lambda: len(peer.messages) >= 10, what="some mail at the peer")
        node.stop()
        stopped = len(peer.messages)
        assert stopped < count, "the drain was over before the stop"
        assert read_drain(node.spool).sent == stopped
        node.start()
        assert f"{stopped} recipient(s) sent there): the front doors refuse new mail" in node.log()
        assert stopped <= drain_sent(node) <= len(peer.messages)

        wait_for(lambda: read_drain(node.spool).sent > stopped, what="the count recorded while running")
        node.kill()
        killed, recorded = len(peer.messages), read_drain(node.spool).sent
        assert killed < count, "the drain was over before the kill"
        node.start()
        assert f"{recorded} recipient(s) sent there): the front doors refuse new mail" in node.log()
        assert recorded <= drain_sent(node) <= len(peer.messages)

        wait_for(lambda: len(subjects(peer)) == count and not (node.files("deferred") or node.files("active")),
                 timeout=120, what="every message at the peer")
        status = status_text(node.spool)
        sent = drain_sent(node)
        assert count - (killed - recorded) <= sent <= len(peer.messages)
        assert re.search(rf": done, {sent} recipient\(s\) sent there and nothing left to send; ", status), status
