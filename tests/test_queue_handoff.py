"""Queue transports that hand a message on: `queue/router DIR` into another qrouter spool (a
chain of queues), and `queue/qpsmtpd PLUGIN ARGS` through a real qpsmtpd queue plugin (Debian's,
in /usr/share/qpsmtpd/plugins) run by the Perl helper. The real daemon delivers through both;
the transports are also called directly, for what a daemon would only make slower to see."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path

import pytest

from policy.next_hop import parse_next_hop
from router.config import Config
from router.spool import Spool
from router.spool.queue_file import QueueFile, Recipient, parse
from router.spool.queue_id import new_queue_id
from tests.daemon import Daemon, after_trace, qrouter, read_only, wait_for
from tests.smtp_servers import AioServer, Recorder
from workers.qpsmtpd_queue import MAX_HELPERS, PLUGINS, QpsmtpdTransport
from workers.router_queue import RouterTransport

ME = "relay.handoff.test"
# CRLF as from SMTP, 8-bit in the header and the body, a line starting with a dot
MESSAGE = (b"From: a@example.org\r\nSubject: gr\xc3\xbc\xc3\x9fe\r\nMessage-ID: <handoff@example.org>\r\n\r\n"
           b"hello \xe4\xf6\xfc\r\n.dot\r\n..two dots\r\n")


def plugin_got(written: bytes, sender: str, recipient: str) -> tuple[str, bytes]:
    """What queue/maildir of qpsmtpd wrote for one recipient with a sub directory: its two header
    lines, then the message with LF line ends. Gives the Received: field of the hand-off, and the
    message after it."""
    header = f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode()
    assert written.startswith(header), written[:200]
    return after_trace(written[len(header):])


def queue_file(*recipients: Recipient, sender: str = "s@example.org", message: bytes = MESSAGE,
               **dsn: str) -> QueueFile:
    queue_id = new_queue_id()
    return QueueFile(queue_id, 0.0, sender, list(recipients), message, **dsn)


def deliver(transport, next_hop: str, message: QueueFile) -> list[tuple[str, str, str]]:
    outcomes = transport.deliver(message, message.recipients, parse_next_hop(next_hop))
    return [(o.status, o.dsn, o.reply) for o in outcomes]


def routed(daemons, tmp_path: Path, rules: str) -> Daemon:
    """A daemon (one worker) routing by the transports file `rules`."""
    (tmp_path / "transports").write_text(rules)
    return daemons("--transports", str(tmp_path / "transports"), "--me", ME, workers=1)


@pytest.fixture
def second_daemon(tmp_path):
    """A daemon in tmp_path/second, the end of a chain (those of `daemons` share one spool);
    started, and killed after the test if it still runs."""
    (tmp_path / "second").mkdir()
    (tmp_path / "second").chmod(0o1777)  # for the daemon's user, as tmp_path itself is
    daemon = Daemon(tmp_path / "second", "--me", ME, workers=1)
    try:
        yield daemon.start()
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()


# -- queue/router ---------------------------------------------------------------------------

def test_a_chain_of_two_daemons(tmp_path, daemons, second_daemon):
    second = second_daemon
    first = routed(daemons, tmp_path, f"x.example queue/router {second.spool}\n")
    queue_id = Spool(first.spool).enqueue("s@example.org", ["u@x.example", "v@x.example"], MESSAGE)

    wait_for(lambda: f"{queue_id}: removed" in first.log(), what="the hand-off")
    lines = [line for line in first.log().splitlines() if f"{queue_id}: to=<" in line]
    assert len(lines) == 2 and all(f"relay=router[{second.spool}], " in line for line in lines)
    [handed] = {line.split("status=sent (queued as ")[1].split(")")[0] for line in lines}  # one message for both
    wait_for(lambda: f"{handed}: removed" in second.log(), what="delivery by the second daemon")
    delivered = [path.read_bytes() for path in second.delivered()]
    assert len(delivered) == 2 and all(content.endswith(MESSAGE) for content in delivered)  # after any trace lines
    assert f"{handed}: to=<u@x.example>, relay=maildir[" in second.log()


def test_the_other_spool_gets_the_envelope_and_the_dsn_fields(tmp_path):
    other = tmp_path / "other"
    Spool(other).create()
    message = queue_file(Recipient("u@x.example", notify="SUCCESS,DELAY", orcpt="rfc822;U@X.example",
                                   dsn="4.4.1", reply="earlier", relay="elsewhere"),
                         Recipient("v@x.example", notify="NEVER"), sender="", envid="ENV1", ret="HDRS")
    [(status, dsn, reply)] = set(deliver(RouterTransport(Config()), f"queue/router {other}", message))
    assert (status, dsn) == ("sent", "2.0.0")
    [name] = os.listdir(other / "incoming")
    assert reply == f"queued as {name}" and os.listdir(other / "tmp") == []
    handed = parse((other / "incoming" / name).read_bytes())
    trace, handed_in = after_trace(handed.message)
    assert (handed.sender, handed_in, handed.envid, handed.ret) == ("", MESSAGE, "ENV1", "HDRS")
    assert re.fullmatch(rf"Received: by \S+ \(qrouter, from queue id {message.queue_id}\) with queue/router "
                        rf"id {name}; .+", trace), trace  # two recipients: no for-part
    assert handed.recipients == [Recipient("u@x.example", notify="SUCCESS,DELAY", orcpt="rfc822;U@X.example"),
                                 Recipient("v@x.example", notify="NEVER")]  # not the results of here


def test_a_spool_shared_with_a_group_gets_files_the_group_may_read(tmp_path):
    other = tmp_path / "other"
    Spool(other, group="nogroup").create()
    message = queue_file(Recipient("u@x.example"))
    [(status, _, reply)] = deliver(RouterTransport(Config()), f"queue/router {other}", message)
    assert status == "sent"
    assert (other / "incoming" / reply.split()[-1]).stat().st_mode & 0o777 == 0o660


def test_an_unwritable_spool_defers_and_the_mail_waits(tmp_path, daemons):
    other = tmp_path / "other"
    Spool(other).create()
    daemon = routed(daemons, tmp_path, f"x.example queue/router {other}\n")
    with read_only(other):  # and, for a daemon that is not root, not its user's to write
        queue_id = Spool(daemon.spool).enqueue("s@example.org", ["u@x.example"], MESSAGE)
        wait_for(lambda: queue_id in daemon.files("deferred"), what="the deferral")
    wait_for(lambda: (f"{queue_id}: to=<u@x.example>, relay=router[{other}], " in daemon.log()
                      and f"dsn=4.3.0, status=deferred (cannot queue into {other}: " in daemon.log()),
             what="the deferral logged")
    assert os.listdir(other / "incoming") == []


def test_a_missing_spool_a_full_disk_and_a_loop_defer(tmp_path):
    transport = RouterTransport(Config(queue_dir=str(tmp_path / "spool")))
    missing = tmp_path / "missing"
    assert deliver(transport, f"queue/router {missing}", queue_file(Recipient("u@x.example"))) == [
        ("deferred", "4.3.0", f"cannot queue into {missing}: No such file or directory (ENOENT)")]
    assert deliver(transport, f"queue/router {tmp_path}/spool/", queue_file(Recipient("u@x.example"))) == [
        ("deferred", "4.3.5", f"{tmp_path}/spool/ is this daemon's own spool: the mail would loop")]

    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        Spool(full).create()
        big = queue_file(Recipient("u@x.example"), Recipient("v@x.example"), message=b"x" * 200_000)
        assert deliver(transport, f"queue/router {full}", big) == [
            ("deferred", "4.3.1", f"cannot queue into {full}: No space left on device (ENOSPC)")] * 2
        assert os.listdir(full / "tmp") == os.listdir(full / "incoming") == []
    finally:
        subprocess.run(["umount", str(full)], check=True)


# -- queue/qpsmtpd --------------------------------------------------------------------------

def test_queue_maildir_plugin_delivers_into_a_maildir(tmp_path, daemons):
    mail = tmp_path / "qmail"
    daemon = routed(daemons, tmp_path, f"m.example queue/qpsmtpd queue/maildir {mail} %d/%l\n")
    queue_id = Spool(daemon.spool).enqueue("s@example.org", ["u@m.example", "v@m.example"], MESSAGE)
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery by queue/maildir")
    for user in ("u", "v"):
        [path] = (mail / "m.example" / user / "new").iterdir()
        trace, handed_in = plugin_got(path.read_bytes(), "s@example.org", f"{user}@m.example")
        assert handed_in == MESSAGE.replace(b"\r\n", b"\n")
        assert re.fullmatch(rf"Received: by {ME} \(qrouter\) with queue/qpsmtpd id {queue_id}; .+", trace), trace
        assert (f"{queue_id}: to=<{user}@m.example>, relay=qpsmtpd[queue/maildir], " in daemon.log()
                and "dsn=2.0.0, status=sent (Queued! <handoff@example.org>)" in daemon.log())


def test_queue_smtp_forward_plugin_forwards_bounces_and_defers(tmp_path, daemons):
    with (AioServer() as sink, AioServer(Recorder(data="554 5.6.0 no thanks")) as refusing,
          AioServer(Recorder(data="451 4.3.2 not now")) as busy):
        daemon = routed(daemons, tmp_path, "".join(
            f"{domain}.example queue/qpsmtpd queue/smtp-forward 127.0.0.1 {server.port}\n"
            for domain, server in (("f", sink), ("b", refusing), ("d", busy))))
        spool = Spool(daemon.spool)
        sent = spool.enqueue("s@example.org", ["u@f.example", "v@f.example"], MESSAGE)
        bounced = spool.enqueue("", ["u@b.example"], MESSAGE)
        deferred = spool.enqueue("s@example.org", ["u@d.example"], MESSAGE)
        wait_for(lambda: f"{sent}: removed" in daemon.log() and f"{bounced}: removed" in daemon.log()
                 and deferred in daemon.files("deferred"), what="three verdicts")
    [received] = sink.handler.messages
    assert (received.mail_from, received.rcpt_tos, after_trace(received.content)[1]) == (
        "s@example.org", ["u@f.example", "v@f.example"], MESSAGE)
    assert sink.handler.hellos == [ME]  # config('me') is qrouter's name
    assert refusing.handler.messages[0].mail_from == "<>"
    log = daemon.log()
    assert f"{sent}: to=<v@f.example>, relay=qpsmtpd[queue/smtp-forward], " in log
    assert "dsn=2.0.0, status=sent (queued as 4711)" in log
    assert (f"{bounced}: to=<u@b.example>, " in log and "dsn=5.6.0, status=bounced (Unable to queue message "
            "(); end of data answered 554 5.6.0 no thanks)" in log)
    assert (f"{deferred}: to=<u@d.example>, " in log and "dsn=4.3.2, status=deferred (Unable to queue message "
            "(); end of data answered 451 4.3.2 not now)" in log)


def test_a_refused_recipient_bounces_alone():
    refusing = Recorder(rcpt={"v@r.example": "550 5.1.1 no such user"})
    transport = QpsmtpdTransport(Config(me=ME))
    try:
        with AioServer(refusing) as server:
            message = queue_file(Recipient("u@r.example"), Recipient("v@r.example"))
            outcomes = deliver(transport, f"queue/qpsmtpd queue/smtp-forward 127.0.0.1 {server.port}", message)
    finally:
        transport.close()
    said = "Unable to queue message (); RCPT TO:<v@r.example> answered 550 5.1.1 no such user"
    assert outcomes == [("deferred", "4.3.0", said), ("bounced", "5.1.1", said)]
    assert refusing.messages == []


PLUGIN_CASES = {
    "ok": ('return (OK, "kept as 42");', ("sent", "2.0.0", "kept as 42")),
    "deny": ('return (DENY, "5.7.1 not for you");', ("bounced", "5.7.1", "5.7.1 not for you")),
    "deny-plain": ('return (DENY_DISCONNECT, "go away");', ("bounced", "5.3.0", "go away")),
    "denysoft": ('return (DENYSOFT, "later\\nmuch later");', ("deferred", "4.3.0", "later much later")),
    "declined": ("return DECLINED;", ("deferred", "4.3.0", "the plugin answered DECLINED")),
    "die": ('die "out of ink\\n";', ("deferred", "4.3.0", "the qpsmtpd plugin failed: out of ink")),
    "prints-to-stdout": ('print "noise\\n"; return (OK, "still fine");', ("sent", "2.0.0", "still fine")),
    "environment": ('return (OK, join(" ", map { "$_=" . ($ENV{$_} // "none") } '
                    'qw(QROUTER_TEST PATH QPSMTPD_CONFIG)));',
                    ("sent", "2.0.0",
                     "QROUTER_TEST=none PATH=/usr/sbin:/usr/bin:/sbin:/bin QPSMTPD_CONFIG=/etc/qpsmtpd")),
    "transaction": ('return (OK, join(" ", $transaction->sender->format, map({ $_->address } '
                    '$transaction->recipients), $transaction->header->get("Subject") =~ s/\\n//r, '
                    '$transaction->body_length));',
                    ("sent", "2.0.0", "<s@example.org> u@p.example v@p.example hi 6")),  # body: "\nbody\n"
}


@pytest.mark.parametrize("case", PLUGIN_CASES)
def test_the_queue_hook_s_answer_is_the_outcome(tmp_path, monkeypatch, case):
    code, expected = PLUGIN_CASES[case]
    monkeypatch.setenv("QROUTER_TEST", "not for the plugin")
    plugin = tmp_path / "queue-test"
    plugin.write_text(f"sub hook_queue {{\n    my ($self, $transaction) = @_;\n    {code}\n}}\n")
    transport = QpsmtpdTransport(Config(me=ME))
    try:
        message = queue_file(Recipient("u@p.example"), Recipient("v@p.example"), message=b"Subject: hi\r\n\r\nbody\r\n")
        assert deliver(transport, f"queue/qpsmtpd {plugin}", message) == [expected] * 2
    finally:
        transport.close()


def test_helpers_are_shared_capped_replaced_and_stopped(tmp_path, caplog):
    plugin = tmp_path / "queue-slow"
    plugin.write_text('sub hook_queue {\n    my ($self) = @_;\n    $self->log(LOGWARN, "slow one");\n'
                      '    exit 3 if $self->{_args}{exit};\n    select(undef, undef, undef, 0.2);\n'
                      '    return (OK, "helper $$");\n}\nsub register { my ($self, $qp, %args) = @_; '
                      '$self->{_args} = {%args} }\n')
    transport = QpsmtpdTransport(Config(me=ME))
    try:
        answers: list[list[tuple[str, str, str]]] = []
        threads = [threading.Thread(target=lambda: answers.append(
            deliver(transport, f"queue/qpsmtpd {plugin}", queue_file(Recipient("u@p.example")))))
            for _ in range(3 * MAX_HELPERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {answer[0][:2] for answer in answers} == {("sent", "2.0.0")}
        helpers = {answer[0][2] for answer in answers}
        assert 1 < len(helpers) <= MAX_HELPERS and transport.running == len(transport.idle) == len(helpers)
        wait_for(lambda: "slow one" in caplog.text, what="the plugin's log line")
        assert "queue/qpsmtpd helper " in caplog.text

        # a helper that dies in a delivery defers it; one found dead is replaced
        assert deliver(transport, f"queue/qpsmtpd {plugin} exit 1", queue_file(Recipient("u@p.example"))) == [
            ("deferred", "4.3.0", "the qpsmtpd helper exited with status 3")]
        assert transport.running == len(helpers) - 1
        for helper in transport.idle:  # they end by themselves
            helper.process.stdin.close()
            helper.process.wait()
        [(status, _, reply)] = deliver(transport, f"queue/qpsmtpd {plugin}", queue_file(Recipient("u@p.example")))
        assert status == "sent" and reply not in helpers and transport.running == len(transport.idle) == 1

        # helpers unused for a while are stopped
        processes = [helper.process for helper in transport.idle]
        for helper in transport.idle:
            helper.idle_since -= 3600
        spools = [Path(helper.spool) for helper in transport.idle]
        transport.close_idle()
        assert transport.running == 0 and all(process.returncode == 0 for process in processes)
        assert not any(spool.exists() for spool in spools)
    finally:
        transport.close()


def test_check_config_names_the_file_and_line_of_a_bad_hand_off(tmp_path):
    transports = tmp_path / "transports"
    transports.write_text(f"ok.example queue/qpsmtpd queue/maildir {tmp_path}\n"
                          "bad.example queue/qpsmtpd queue/nonesuch\n")
    result = qrouter("check-config", "--transports", str(transports))
    assert result.returncode == 78
    found = ", ".join(sorted(f"queue/{name}" for name in os.listdir(f"{PLUGINS}/queue")))
    assert (f"{transports}:2: next hop 'queue/qpsmtpd queue/nonesuch': queue/qpsmtpd: no qpsmtpd plugin "
            f"'queue/nonesuch' in {PLUGINS} (found: {found})").encode() in result.stderr

    transports.write_text("worse.example queue/router\n")
    result = qrouter("check-config", "--transports", str(transports))
    assert result.returncode == 78
    assert f"{transports}:1: next hop 'queue/router': queue/router: needs the spool directory".encode() in result.stderr


@pytest.mark.parametrize(("transport", "argument", "error"), [
    (RouterTransport, "", "needs the spool directory of the next qrouter"),
    (QpsmtpdTransport, " ", "needs a qpsmtpd queue plugin and its arguments, e.g. "),
    (QpsmtpdTransport, "queue/maildir /var/mail/caf\u00e9", "qpsmtpd takes plugin lines of printable ASCII only"),
    (QpsmtpdTransport, "/nowhere/queue/x", "no qpsmtpd plugin '/nowhere/queue/x' in "),
])
def test_check_refuses(transport, argument, error):
    with pytest.raises(ValueError, match=error):
        transport.check(argument)
