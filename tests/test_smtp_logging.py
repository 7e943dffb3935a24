"""What the log and a queue file's history say about SMTP delivery, through the real daemon:
a server that failed before the next one took the message, and a server's reply quoted as
it was written. Real aiosmtpd servers, loopback only."""

from __future__ import annotations

from router.spool import Spool
from router.spool.queue_file import parse
from tests.daemon import wait_for
from tests.smtp_servers import AioServer, Recorder, free_port

FAST = ["--smtp-timeouts", "connect=2,greeting=3,helo=3,mail=3,rcpt=3,data=3,block=3,dot=3",
        "--min-backoff", "60", "--me", "relay.qrouter.test"]


def enqueue(daemon, recipient: str = "a@example.org") -> str:
    return Spool(daemon.spool).enqueue("s@example.org", [recipient], b"Subject: t\r\n\r\nbody\r\n")


def lines_of(daemon, queue_id: str) -> list[str]:
    return [line for line in daemon.log().splitlines() if f"{queue_id}: " in line]


def test_a_refused_connection_is_logged_before_the_next_relay_takes_the_message(daemons):
    with AioServer(host="127.0.0.2") as good:
        dead = free_port("127.0.0.4")
        # one worker: its first message starts at the first relay host, the dead one
        daemon = daemons("--relayhost", f"[127.0.0.4]:{dead},[127.0.0.2]:{good.port}", *FAST, workers=1)
        queue_id = enqueue(daemon)
        wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery by the second relay")
    lines = lines_of(daemon, queue_id)
    failed = [line for line in lines if "connect to" in line]
    assert len(failed) == 1
    assert failed[0].endswith(f"{queue_id}: connect to 127.0.0.4[127.0.0.4]:{dead}: Connection refused")
    [sent] = [line for line in lines if "to=<a@example.org>" in line]
    assert f"relay=127.0.0.2[127.0.0.2]:{good.port}," in sent and "status=sent" in sent
    assert lines.index(failed[0]) < lines.index(sent)


def test_every_failed_relay_is_in_the_history_of_the_deferred_message(daemons):
    first, second = free_port("127.0.0.4"), free_port("127.0.0.2")
    daemon = daemons("--relayhost", f"[127.0.0.4]:{first},[127.0.0.2]:{second}", *FAST, workers=1)
    queue_id = enqueue(daemon)
    path = daemon.spool / "deferred" / queue_id
    wait_for(path.exists, what="the deferral")
    history = [entry.split(" ", 1)[1] for entry in parse(path.read_bytes(), str(path)).log]
    assert history == [f"connect to 127.0.0.4[127.0.0.4]:{first}: Connection refused",
                       f"connect to 127.0.0.2[127.0.0.2]:{second}: Connection refused",
                       "attempt 1: 0 sent, 1 deferred, 0 bounced"]
    assert sum("Connection refused" in line and "to=<" not in line for line in lines_of(daemon, queue_id)) == 2


def test_the_reply_is_logged_as_the_server_wrote_it(daemons):
    with AioServer(Recorder(data="250 Ok: queued as 0001")) as sink:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{sink.port}", *FAST)
        queue_id = enqueue(daemon)
        wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery")
    [sent] = [line for line in lines_of(daemon, queue_id) if "to=<a@example.org>" in line]
    assert sent.endswith("dsn=2.0.0, status=sent (250 Ok: queued as 0001), attempts=1")
