"""qpsmtpd in front of qrouter: the real qpsmtpd-forkserver with the queue/router plugin from
packaging/qpsmtpd, a real qrouter daemon behind it (started by the plugin, or separately), real
aiosmtpd servers as next hops and swaks as the client (Python's smtplib for the run of 500
messages). Loopback only."""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import random
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from router.front.aiosmtpd import QueueController, QueueHandler
from router.spool import Spool
from router.spool.address import AddressError, parse_path
from router.spool.queue_file import parse
from tests.daemon import Daemon, wait_for
from tests.qpsmtpd_server import (
    ME,
    PLUGIN_DIR,
    QROUTER,
    QpsmtpdServer,
    alive,
    daemon_pid,
    smtp_data,
    swaks,
)
from tests.smtp_servers import AioServer, free_port
from tests.test_reports import ORIGINAL, SENDER, permanent, policy_args, reports, status_groups

QUEUE_ID = re.compile(r"[0-9A-F]{13}-[0-9A-F]+-[0-9A-F]+")
FAST = ["smtp-timeouts", "connect=2,greeting=3,helo=3,mail=3,rcpt=3,data=3,block=3,dot=10",
        "min-backoff", "60", "me", "relay.qrouter.test"]

# CRLF line ends as on the wire; 8-bit in a header and the body; lines starting with dots,
# one of them a lone dot; trailing white space; an empty last line.
MESSAGE = (b"From: Alice <alice@example.org>\r\n"
           b"To: a@one.example, b@two.example\r\n"
           b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
           b"X-Raw: gr\xc3\xbc\xc3\x9fe, 8-bit in a header\r\n"
           b"\r\n"
           b".leading dot\r\n"
           b"..two leading dots\r\n"
           b".\r\n"
           b"Latin-1 \xe4\xf6\xfc and every high byte: " + bytes(range(0x80, 0x100)) + b"\r\n"
           b"trailing white space \t \r\n"
           b"\r\n")


def as_flags(pairs: list[str]) -> list[str]:
    """Plugin-line pairs as `qrouter run` flags."""
    return [f"--{item}" if i % 2 == 0 else item for i, item in enumerate(pairs)]


def added_by_qpsmtpd(content: bytes, message: bytes) -> list[bytes]:
    """What arrived is qpsmtpd's own header lines, then the message exactly as sent; those lines."""
    assert content.endswith(message), "the message did not arrive byte for byte"
    added = content[: len(content) - len(message)]
    assert added.endswith(b"\r\n")
    lines = added[:-2].split(b"\r\n")
    assert lines[0].startswith(b"Received: from ")
    assert all(line.startswith((b"Received: ", b"Authentication-Results: ", b" ", b"\t")) for line in lines), lines
    return lines


def queued_as(result) -> str:
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    match = re.search(r"^<-  250 Queued as (\S+)$", out, re.MULTILINE)
    assert match, out
    assert QUEUE_ID.fullmatch(match.group(1))
    return match.group(1)


def sent_alone(port: int, n: int) -> str:
    """Message n over a connection of its own, from Python's SMTP client: a swaks process for
    each of hundreds of messages costs more than all the rest of a test. Its queue id, from
    qpsmtpd's "250 Queued as ID"."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test", timeout=60) as client:
        assert client.ehlo()[0] == 250
        assert client.mail(f"s{n}@example.org")[0] == 250
        assert client.rcpt(f"r{n}@example.net")[0] == 250
        code, reply = client.data(f"Subject: message {n}\r\n\r\nmessage {n}\r\n".encode())
    match = re.fullmatch(r"Queued as (\S+)", reply.decode(errors="replace"))
    assert code == 250 and match, (code, reply)
    assert QUEUE_ID.fullmatch(match.group(1))
    return match.group(1)


def arrival(queue_id: str) -> str:
    """The arrival time a writer puts beside this id: the id's microseconds, six decimals."""
    seconds, micros = divmod(int(queue_id[:13], 16), 10**6)
    return f"{seconds}.{micros:06d}"


def lock_held(spool: Path) -> bool:
    try:
        fd = os.open(spool / "qrouter.pid", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_plugin_starts_one_daemon_and_every_recipient_reaches_its_next_hop_byte_for_byte(tmp_path, qpsmtpd):
    spool = tmp_path / "spool"
    data = tmp_path / "message.smtp"
    data.write_bytes(smtp_data(MESSAGE))
    with AioServer(host="127.0.0.2") as one, AioServer(host="127.0.0.3") as two:
        transports = tmp_path / "transports"
        transports.write_text(f"one.example  [127.0.0.2]:{one.port}\ntwo.example  [127.0.0.3]:{two.port}\n")
        plugin_args = ["transports", str(transports), "workers", "2", "log", str(tmp_path / "qrouter.log"), *FAST]
        server = qpsmtpd(spool, *plugin_args)
        pid = daemon_pid(spool)
        assert pid and alive(pid) and lock_held(spool)
        assert os.getsid(pid) != os.getsid(server.process.pid), "the daemon stayed in qpsmtpd's session"
        assert f"qrouter daemon pid {pid} serves {spool}" in server.log()

        first = queued_as(swaks(server.port, "--from", "alice@example.org",
                                "--to", "a@one.example,b@two.example,c@one.example", data=data))
        bounce = queued_as(swaks(server.port, "--from", "<>", "--to", "d@two.example", data=data))
        assert first != bounce
        wait_for(lambda: len(one.handler.messages) == 1 and len(two.handler.messages) == 2, what="three deliveries")

        # qpsmtpd restarts: the plugin finds the daemon serving the spool and starts no other
        server.stop()
        again = qpsmtpd(spool, *plugin_args)
        assert f"qrouter daemon pid {pid} already serves {spool}" in again.log()
        assert daemon_pid(spool) == pid and alive(pid)
        queued_as(swaks(again.port, "--from", "carol@example.org", "--to", "e@one.example", data=data))
        wait_for(lambda: len(one.handler.messages) == 2, what="delivery after the restart")

    [to_one, after_restart] = one.handler.messages
    assert (to_one.mail_from, to_one.rcpt_tos) == ("alice@example.org", ["a@one.example", "c@one.example"])
    assert (after_restart.mail_from, after_restart.rcpt_tos) == ("carol@example.org", ["e@one.example"])
    by_sender = {m.mail_from: m for m in two.handler.messages}
    assert by_sender["alice@example.org"].rcpt_tos == ["b@two.example"]
    assert by_sender["<>"].rcpt_tos == ["d@two.example"]  # the null sender stays null
    for received in [*one.handler.messages, *two.handler.messages]:
        added = added_by_qpsmtpd(received.content, MESSAGE)
        assert any(b"by qpsmtpd.example.test" in line for line in added)
    log = (tmp_path / "qrouter.log").read_text()
    assert f"{first}: to=<a@one.example>, relay=127.0.0.2[127.0.0.2]:{one.port}" in log
    assert f"{bounce}: to=<d@two.example>, relay=127.0.0.3[127.0.0.3]:{two.port}" in log


@pytest.mark.parametrize("where, ehlo", [("nowhere", ME), ("line", "line.qrouter.test"),
                                         ("config", "config.qrouter.test")])
def test_the_daemon_says_ehlo_as_qpsmtpd_s_me_unless_qrouter_s_me_is_set(tmp_path, qpsmtpd, where, ehlo):
    """Without `me` on the plugin line or in the config file, the daemon the plugin starts gets
    qpsmtpd's own name (its config/me), not a name of its own that may be `localhost`."""
    spool = tmp_path / "spool"
    config = tmp_path / "qrouter.conf"
    config.write_text("me config.qrouter.test\n" if where == "config" else "workers 1\n")
    with AioServer() as sink:
        server = qpsmtpd(spool, "config", str(config), "relayhost", f"[127.0.0.1]:{sink.port}",
                         *(["me", ehlo] if where == "line" else []))
        command = Path(f"/proc/{daemon_pid(spool)}/cmdline").read_bytes().split(b"\0")
        assert (b"--me" in command) == (where != "config")
        queue_id = queued_as(swaks(server.port, "--from", "a@example.org", "--to", "r@example.net"))
        wait_for(lambda: sink.handler.messages, what=f"delivery of {queue_id}")
    assert sink.handler.hellos == [ehlo]


def test_queue_file_is_written_as_the_format_says_and_waits_for_the_daemon(tmp_path, qpsmtpd, daemons):
    spool = tmp_path / "spool"
    Spool(spool).create()
    data = tmp_path / "message.smtp"
    data.write_bytes(smtp_data(MESSAGE))
    server = qpsmtpd(spool, own_daemon=False)
    assert f"no qrouter daemon serves {spool} yet" in server.log()
    queue_id = queued_as(swaks(server.port, "--from", "alice@example.org",
                               "--to", "b@two.example,a@one.example,b@two.example", data=data))
    assert listing(spool / "tmp") == []
    assert listing(spool / "incoming") == [queue_id]
    path = spool / "incoming" / queue_id
    assert path.stat().st_mode & 0o777 == 0o660
    content = path.read_bytes()
    head, message = content.split(b"\n\n", 1)
    assert head.decode().split("\n") == [
        "qrouter-queue-file 1", f"id {queue_id}", f"arrival {arrival(queue_id)}", "attempts 0",
        "sender <alice@example.org>",
        "rcpt <b@two.example>", "rcpt <a@one.example>", "rcpt <b@two.example>",  # in RCPT order, as given
        f"size {len(message)}"]
    # as qpsmtpd hands it over: its own header lines first, line ends LF
    lf_message = MESSAGE.replace(b"\r\n", b"\n")
    assert message.endswith(lf_message)
    assert message.startswith(b"Received: from ")
    assert parse(content, str(path)).message == message

    daemon = daemons()  # started later: the waiting message goes out
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery of the waiting message")
    [delivered] = daemon.delivered("two.example/b")
    assert delivered.read_bytes().endswith(lf_message)
    assert len(daemon.delivered("one.example/a")) == 1


def test_qpsmtpd_as_another_user_queues_through_spool_group():
    """qpsmtpd as `nobody` (group nogroup) in front of qrouter with `spool-group nogroup`: the
    spool is the group's to write, qpsmtpd's files are the group's to read, and they go out.

    qrouter, started as root, runs as its user qrouter, which can read the file nobody queued
    only as a member of the spool group."""
    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrnam("nogroup").gr_gid
    base = Path(tempfile.mkdtemp(prefix="qrouter-users-", dir="/tmp"))  # pytest's tmp_path is root's alone
    os.chmod(base, 0o755)
    spool = base / "spool"
    sink = AioServer()
    daemon = Daemon(base, "--relayhost", f"[127.0.0.1]:{sink.port}", "--spool-group", "nogroup",
                    *as_flags(FAST), maildir=False)
    try:
        with sink:
            daemon.start()  # makes the spool
            for directory in [spool, *(spool / q for q in ("tmp", "incoming", "active", "deferred"))]:
                info = directory.stat()
                assert (info.st_gid, info.st_mode & 0o7777) == (nogroup, 0o2770), directory
            assert daemon.stop() == 0  # so the message waits in incoming/ to be looked at

            server = QpsmtpdServer(base / "qpsmtpd", ["qrouter", QROUTER, "queue-dir", str(spool), "no-daemon", "1"],
                                   user="nobody").start()
            try:
                assert "Running as user nobody" in server.log()
                queue_id = queued_as(swaks(server.port, "--from", "alice@example.org", "--to", "r@example.net"))
            finally:
                server.stop()
            info = (spool / "incoming" / queue_id).stat()
            assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (nobody.pw_uid, nogroup, 0o660)

            daemon.start()
            wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery of the message qpsmtpd queued")
            assert daemon.stop() == 0
        [received] = sink.handler.messages
        assert (received.mail_from, received.rcpt_tos) == ("alice@example.org", ["r@example.net"])
        assert listing(spool / "incoming") == listing(spool / "active") == listing(spool / "tmp") == []
    finally:
        daemon.stop()
        shutil.rmtree(base)


def test_separately_started_daemon_gets_a_10_mb_message_byte_for_byte(tmp_path, qpsmtpd, daemons):
    rng = random.Random(10)
    printable = bytes(b if b >= 0x20 else b + 0x40 for b in range(256))  # no CR, LF or other controls
    lines = [rng.randbytes(98).translate(printable) for _ in range(10 * 2**20 // 100)]
    message = b"Subject: ten megabytes\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    data = tmp_path / "big.smtp"
    data.write_bytes(smtp_data(message))
    with AioServer() as sink:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{sink.port}", *as_flags(FAST), maildir=False)
        server = qpsmtpd(daemon.spool, own_daemon=False)
        assert f"qrouter daemon pid {daemon.process.pid} serves {daemon.spool}" in server.log()
        queue_id = queued_as(swaks(server.port, "--from", "big@example.org", "--to", "r@example.net", data=data))
        wait_for(lambda: f"{queue_id}: removed" in daemon.log(), timeout=60, what="the big message")
    [received] = sink.handler.messages
    assert len(message) > 10 * 10**6
    added_by_qpsmtpd(received.content, message)
    assert daemon_pid(daemon.spool) == daemon.process.pid  # qpsmtpd started no daemon of its own


def test_unwritable_spool_gives_a_temporary_failure_and_leaves_nothing_behind(tmp_path, qpsmtpd, daemons):
    data = tmp_path / "message.smtp"
    data.write_bytes(smtp_data(MESSAGE))
    with AioServer() as sink:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{sink.port}", *as_flags(FAST), maildir=False)
        server = qpsmtpd(daemon.spool, own_daemon=False)
        for queue in ("incoming", "tmp"):
            server.read_only(daemon.spool / queue)
            try:
                result = swaks(server.port, "--from", "a@example.org", "--to", "u@example.net", data=data)
            finally:
                server.writable(daemon.spool / queue)
            out = result.stdout.decode(errors="replace")
            assert result.returncode == 26, out  # swaks: the server did not accept the mail after DATA
            assert "<** 452 Queue temporarily unavailable, try again later" in out
            assert listing(daemon.spool / "tmp") == listing(daemon.spool / "incoming") == []
        log = server.log()
        assert "cannot rename" in log and "cannot create" in log and "Read-only file system" in log
        # the client tries again once the spool is back: the message arrives, once
        queue_id = queued_as(swaks(server.port, "--from", "a@example.org", "--to", "u@example.net", data=data))
        wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery of the retried message")
    [received] = sink.handler.messages
    added_by_qpsmtpd(received.content, MESSAGE)
    assert listing(daemon.spool / "tmp") == listing(daemon.spool / "incoming") == listing(daemon.spool / "active") == []


def test_addresses_qrouter_cannot_queue_are_refused_before_the_message_is_accepted(tmp_path, qpsmtpd, daemons):
    daemon = daemons()  # delivers into Maildirs under tmp_path/mail
    server = qpsmtpd(daemon.spool, own_daemon=False)
    result = swaks(server.port, "--from", "a@example.org", "--to", "postmaster,ok@example.org")
    out = result.stdout.decode(errors="replace")
    assert "<** 550 Recipient address has no local part and domain (user@domain)" in out
    queue_id = queued_as(result)
    long_local = "x" * 65
    result = swaks(server.port, "--from", f"{long_local}@example.org", "--to", "ok@example.org")
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 23, out  # refused at MAIL FROM
    assert "<** 550 Sender address has a local part longer than 64 octets" in out
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery")
    assert len(daemon.delivered("example.org/ok")) == 1
    assert listing(daemon.spool / "incoming") == listing(daemon.spool / "corrupt") == []


def test_cr_lf_nul_in_an_address_never_reach_the_queue_file(tmp_path, qpsmtpd):
    """A bare CR or a NUL inside MAIL FROM or RCPT TO (swaks would not send them: a raw session
    does): refused one by one, and the queue file holds the good recipient alone."""
    spool = tmp_path / "spool"
    Spool(spool).create()
    server = qpsmtpd(spool, own_daemon=False)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock, sock.makefile("rb") as replies:

        def reply() -> bytes:
            while (line := replies.readline())[3:4] == b"-":
                pass
            return line[:3]

        def command(line: bytes) -> bytes:
            sock.sendall(line + b"\r\n")
            return reply()

        assert reply() == b"220"
        assert command(b"EHLO client.example") == b"250"
        assert command(b"MAIL FROM:<s@example.org\rRCPT TO:<evil@example.org>>")[:1] == b"5"
        assert command(b"MAIL FROM:<s\x00@example.org>")[:1] == b"5"
        assert command(b"MAIL FROM:<s@example.org>") == b"250"
        assert command(b"RCPT TO:<a@example.org\rRCPT TO:<evil@example.org>>")[:1] == b"5"
        assert command(b"RCPT TO:<a\x00RCPT TO:<evil@example.org>>")[:1] == b"5"
        assert command(b"RCPT TO:<ok@example.org>") == b"250"
        assert command(b"DATA") == b"354"
        assert command(b"Subject: x\r\n\r\nx\r\n.") == b"250"
    [name] = listing(spool / "incoming")
    stored = parse((spool / "incoming" / name).read_bytes())
    assert (stored.sender, [r.address for r in stored.recipients]) == ("s@example.org", ["ok@example.org"])


def test_500_messages_from_10_concurrent_clients_arrive_exactly_once(tmp_path, qpsmtpd):
    with AioServer() as sink:
        config_dir = tmp_path / "etc"
        config_dir.mkdir()
        config = config_dir / "qrouter.conf"
        # queue-dir relative to the config file, as qrouter itself reads it
        settings = ["queue-dir", "../spool", "relayhost", f"[127.0.0.1]:{sink.port}", "workers", "4",
                    "log", str(tmp_path / "qrouter.log"), *FAST]
        config.write_text("".join(f"{k} {v}\n" for k, v in zip(settings[::2], settings[1::2], strict=True)))
        spool = tmp_path / "spool"
        server = qpsmtpd(spool, "config", str(config), spool_on_line=False)
        assert daemon_pid(spool) and lock_held(spool)

        def client(number: int) -> list[str]:
            return [sent_alone(server.port, n) for n in range(number * 50, number * 50 + 50)]

        with ThreadPoolExecutor(10) as pool:
            ids = [queue_id for chunk in pool.map(client, range(10)) for queue_id in chunk]
        assert len(set(ids)) == 500
        wait_for(lambda: len(sink.handler.messages) >= 500, timeout=60, what="500 deliveries")
        wait_for(lambda: not any(listing(spool / q) for q in ("incoming", "active", "deferred")), what="an empty queue")
    subjects = Counter(re.search(rb"^Subject: message (\d+)\r$", m.content, re.MULTILINE).group(1)
                       for m in sink.handler.messages)
    assert len(sink.handler.messages) == 500
    assert sorted(int(s) for s in subjects) == list(range(500)) and set(subjects.values()) == {1}
    for message in sink.handler.messages:
        n = re.search(rb"^Subject: message (\d+)\r$", message.content, re.MULTILINE).group(1).decode()
        assert (message.mail_from, message.rcpt_tos) == (f"s{n}@example.org", [f"r{n}@example.net"])


def test_a_daemon_that_cannot_start_keeps_qpsmtpd_from_starting(tmp_path, qpsmtpd):
    spool = tmp_path / "spool"
    (tmp_path / "bad.transports").write_text("one.example  [127.0.0.2]:2525\nfoo.example  queue/nonsense x\n")
    config = tmp_path / "qrouter.conf"
    config.write_text("transports bad.transports\n")
    server = qpsmtpd(spool, "config", str(config), start=False)
    server.start(wait=False)
    assert server.wait_exit() != 0
    log = server.log()
    assert f"cannot start the qrouter daemon for {spool}" in log
    assert f"{tmp_path / 'bad.transports'}:2: next hop 'queue/nonsense x': unknown queue transport" in log
    assert not lock_held(spool)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


def test_without_a_spool_qpsmtpd_with_no_daemon_refuses_to_start(tmp_path, qpsmtpd):
    spool = tmp_path / "spool"
    server = qpsmtpd(spool, own_daemon=False, start=False)
    server.start(wait=False)
    assert server.wait_exit() != 0
    assert f"cannot queue into {spool}: {spool}/tmp is missing" in server.log()


ADDRESSES = [
    "<>", "<user@example.org>", '<"john smith"@example.org>', '<"john\\ smith"@example.org>',
    "<jörg@bücher.example>", "<postmaster@[192.0.2.1]>", "<root@[IPv6:::1]>", "<a@[IPv6:::ffff:1.2.3.4]>",
    "<a@[x-tag:text]>", "<a@xn--bcher-kva.example>", f"<{'l' * 64}@example.org>", f"<a@{'d' * 63}.org>",
    f"<a@{'.'.join(['d' * 60] * 4)}>",
    "<user>", "<postmaster>", "<user@-example.org>", "<user@example.org.>", "<a..b@example.org>",
    f"<{'l' * 65}@example.org>", f"<a@{'d' * 64}.org>", "<.a@example.org>", "<a.@example.org>",
    "<a@b..c>", "<@example.org>", "<a@>", "<a@[300.1.1.1]>", "<a@[01.1.1.1]>", "<a@[1.2.3]>",
    "<a@[IPv6:fe80::1%eth0]>", "<a@[IPv6:1:2:3:4:5:6:7:8:9]>", "<a@[tag:]>", '<"open@example.org>',
    "<a b@example.org>", "<a@exa mple.org>", "<a@b_c.org>", "<a@[1.2.3.4]x>", "user@example.org",
    f"<{'l' * 64}@{'d' * 63}.{'d' * 63}.{'d' * 63}.{'d' * 60}>",
]


def test_the_plugin_refuses_exactly_the_addresses_qrouter_refuses():
    """The plugin's address check (at MAIL and RCPT) is a copy of qrouter's rules in Perl; run it
    through qpsmtpd's own plugin loader and compare, address by address."""
    script = """
        use Qpsmtpd::Plugin;
        Qpsmtpd::Plugin->compile('queue::router', 'Qpsmtpd::Plugin::queue::router', $ARGV[0]);
        binmode STDIN; binmode STDOUT;
        while (my $line = <STDIN>) {
            chomp $line;
            my $problem = Qpsmtpd::Plugin::queue::router::path_problem($line, 1);
            print defined $problem ? "refused: $problem\\n" : "ok\\n";
        }
    """
    result = subprocess.run(["perl", "-e", script, str(PLUGIN_DIR / "queue" / "router")], capture_output=True,
                            input="".join(f"{a}\n" for a in ADDRESSES).encode(), timeout=30, check=True)
    verdicts = result.stdout.decode().splitlines()
    assert len(verdicts) == len(ADDRESSES), result.stderr.decode()

    def qrouter_accepts(address: str) -> bool:
        try:
            parse_path(address, null_ok=True)
        except AddressError:
            return False
        return address.startswith("<")  # queue files hold paths in angle brackets

    disagreements = [(a, v) for a, v in zip(ADDRESSES, verdicts, strict=True) if (v == "ok") != qrouter_accepts(a)]
    assert disagreements == []
    assert sum(v == "ok" for v in verdicts) == 13


def dsn_session(port: int, mail_options: list[str], recipients: dict[str, list[str]], message: bytes) -> str:
    """One message with DSN parameters (swaks has no way to give them): EHLO must offer DSN, every
    command must be taken. Its queue id, from qpsmtpd's "250 Queued as ID"."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test", timeout=60) as client:
        assert client.ehlo()[0] == 250 and client.has_extn("dsn"), client.esmtp_features
        assert client.mail(SENDER, mail_options)[0] == 250
        for rcpt, options in recipients.items():
            assert client.rcpt(rcpt, options)[0] == 250
        code, reply = client.data(message)
    assert code == 250, (code, reply)
    return reply.decode().removeprefix("Queued as ")


def test_dsn_parameters_through_qpsmtpd_decide_the_reports_and_what_they_say(tmp_path, qpsmtpd, daemons):
    """NOTIFY=NEVER gets no report, NOTIFY=SUCCESS,FAILURE with ORCPT and ENVID a report that
    names them, RET=HDRS one that returns the header only; without RET the whole message."""
    daemon = daemons(*policy_args(tmp_path, "fail.example queue/error 5.1.1 no such user"))
    server = qpsmtpd(daemon.spool, own_daemon=False)
    never = dsn_session(server.port, ["ENVID=never"], {"x@fail.example": ["NOTIFY=NEVER"]}, ORIGINAL)
    failed = dsn_session(server.port, ["RET=hdrs", "ENVID=Q+2B1+3D+3D"],
                         {"y@fail.example": ["NOTIFY=success,FAILURE", "ORCPT=rfc822;orig+2Btag@sender.example"]},
                         ORIGINAL)
    delivered = dsn_session(server.port, ["ENVID=ok"], {"ok@ok.example": ["NOTIFY=SUCCESS"]}, ORIGINAL)
    # the notification lines are logged after the reports are queued: they may be delivered first
    found = wait_for(lambda: len(reports(daemon)) == 2 and f"{never}: removed" in daemon.log()
                     and f"{failed}: sender non-delivery notification" in daemon.log()
                     and f"{delivered}: sender delivery status notification" in daemon.log() and reports(daemon),
                     what="two reports logged and the message with NOTIFY=NEVER done")
    by_envid = {status_groups(report)[0]["Original-Envelope-Id"]: report for report in found}
    assert set(by_envid) == {"Q+1==", "ok"}, "a report for NOTIFY=NEVER, or the ENVID not as given"
    assert f"{never}: to=<x@fail.example>" in daemon.log()

    report = by_envid["Q+1=="]
    [recipient] = status_groups(report)[1:]
    assert recipient["Original-Recipient"] == "rfc822; orig+tag@sender.example"
    assert (recipient["Final-Recipient"], recipient["Action"]) == ("rfc822; y@fail.example", "failed")
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert ORIGINAL.split(b"\n\n")[0].decode() in returned.get_content().replace("\r\n", "\n")
    assert "the body" not in returned.get_content()
    assert permanent(report) == {b"orig+tag@sender.example"}  # a bounce processor goes by ORCPT

    report = by_envid["ok"]
    [recipient] = status_groups(report)[1:]
    assert (recipient["Final-Recipient"], recipient["Action"]) == ("rfc822; ok@ok.example", "delivered")
    assert "Original-Recipient" not in recipient
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    assert b"the body" in returned.as_bytes()


# Commands after EHLO, each after RSET: MAIL alone, or a good MAIL and then the RCPT.
DSN_COMMANDS = [
    "MAIL FROM:<a@example.org> RET=FULL ENVID=a+2Bb",
    "MAIL FROM:<a@example.org> RET=SOME",
    "MAIL FROM:<a@example.org> RET=HDRS RET=FULL",
    "MAIL FROM:<a@example.org> ENVID=a+2",
    "MAIL FROM:<a@example.org> ENVID=a+0Ab",
    "MAIL FROM:<a@example.org> ENVID=" + "x" * 101,
    "MAIL FROM:<a@example.org> ENVID",
    "MAIL FROM:<a@example.org> NOTIFY=NEVER",
    "RCPT TO:<b@example.org> NOTIFY=success,delay ORCPT=rfc822;b+2Bx@example.org",
    "RCPT TO:<b@example.org> NOTIFY=NEVER,SUCCESS",
    "RCPT TO:<b@example.org> NOTIFY=BOGUS",
    "RCPT TO:<b@example.org> NOTIFY=SUCCESS NOTIFY=FAILURE",
    "RCPT TO:<b@example.org> ORCPT=b@example.org",
    "RCPT TO:<b@example.org> ORCPT=rfc822;b+ZZ@example.org",
    "RCPT TO:<b@example.org> ORCPT=rfc822;",
    "RCPT TO:<b@example.org> RET=HDRS",
]


def replies(port: int, commands: list[str]) -> tuple[bool, list[str]]:
    """Whether EHLO offers DSN, and each command's reply: the code, and for a 501 its text."""
    answers = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test", timeout=60) as client:
        client.ehlo()
        for command in commands:
            assert client.rset()[0] == 250
            if command.startswith("RCPT"):
                assert client.docmd("MAIL FROM:<a@example.org>")[0] == 250
            code, text = client.docmd(command)
            answers.append(f"{code} {text.decode()}" if code == 501 else str(code))
        return client.has_extn("dsn"), answers


def test_qpsmtpd_takes_and_refuses_dsn_parameters_as_qrouter_s_own_door_does(tmp_path, qpsmtpd):
    """The same commands to qpsmtpd and to qrouter's aiosmtpd door (router/front/aiosmtpd.py, with
    DSN): the same replies, and the same DSN lines in the queue files they write. With `dsn 0`
    qpsmtpd offers no DSN and refuses its parameters as an aiosmtpd door without DSN does."""
    spool, own_spool = tmp_path / "spool", tmp_path / "own-spool"
    Spool(spool).create()
    Spool(own_spool).create()
    with_dsn = qpsmtpd(spool, own_daemon=False)
    without = qpsmtpd(spool, "dsn", "0", own_daemon=False)
    own_port, plain_port = free_port(), free_port()
    own = QueueController(QueueHandler(own_spool), hostname="127.0.0.1", port=own_port)
    plain = Controller(QueueHandler(own_spool), hostname="127.0.0.1", port=plain_port)
    own.start()
    plain.start()
    try:
        offered, answers = replies(with_dsn.port, DSN_COMMANDS)
        own_offered, own_answers = replies(own_port, DSN_COMMANDS)
        for command, answer, own_answer in zip(DSN_COMMANDS, answers, own_answers, strict=True):
            assert answer == own_answer, command
        assert offered and own_offered
        assert answers[:2] == ["250", "501 5.5.4 Bad RET parameter: it is FULL or HDRS"]
        assert answers.count("250") == 2 and answers.count("555") == 2, answers
        assert "501 5.5.4 NOTIFY parameter given twice" in answers

        dsn_commands = [command for command in DSN_COMMANDS if "NOTIFY" in command or "RET" in command]
        not_offered, refused = replies(without.port, dsn_commands)
        assert (not_offered, refused) == replies(plain_port, dsn_commands)
        assert not not_offered and set(refused) == {"555"}

        for port in (with_dsn.port, own_port):
            dsn_session(port, ["RET=hdrs", "ENVID=Q+2B1+3D+3D"],
                        {"a@example.org": ["NOTIFY=delay,failure", "ORCPT=rfc822;orig+2Btag@example.org"],
                         "b@example.org": [], "c@example.org": ["NOTIFY=never"]}, ORIGINAL)
    finally:
        own.stop()
        plain.stop()
    [queued], [own_queued] = listing(spool / "incoming"), listing(own_spool / "incoming")
    lines = [line for line in (spool / "incoming" / queued).read_text(errors="replace").split("\n\n")[0].split("\n")
             if line.split(" ")[0] in ("envid", "ret", "rcpt", "notify", "orcpt")]
    assert lines == ["envid Q+1==", "ret HDRS", "rcpt <a@example.org>", "notify DELAY,FAILURE",
                     "orcpt rfc822;orig+tag@example.org", "rcpt <b@example.org>", "rcpt <c@example.org>",
                     "notify NEVER"]
    stored, own_stored = (parse((where / "incoming" / name).read_bytes()) for where, name in
                          ((spool, queued), (own_spool, own_queued)))
    assert (stored.envid, stored.ret, stored.recipients) == (own_stored.envid, own_stored.ret, own_stored.recipients)


def test_a_reverse_lookup_that_gets_no_answer_is_asked_twice_and_the_client_greeted(tmp_path, qpsmtpd):
    """qpsmtpd looks up every client's name before its greeting (tests/qpsmtpd_server.py); from a
    DNS server that never answers, Net::DNS's defaults would keep the client waiting 75 s, longer
    than it waits. With the test resolv.conf's `timeout:1 attempts:2` the question goes out twice,
    and the client is greeted as a host without a name and its mail queued."""
    spool = tmp_path / "spool"
    Spool(spool).create()
    server = qpsmtpd(spool, own_daemon=False)
    server.dns.silence("1.0.0.127.in-addr.arpa.")
    queue_id = queued_as(swaks(server.port, "--from", "a@example.org", "--to", "b@example.org"))
    assert listing(spool / "incoming") == [queue_id]
    assert "from 127.0.0.1 / Unknown" in server.log()
    asked = [q for q in server.dns.queries if q.name == "1.0.0.127.in-addr.arpa"]
    assert [(q.rdtype, q.transport) for q in asked] == [("PTR", "udp")] * 2
