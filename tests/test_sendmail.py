"""`qrouter-sendmail` and `qrouter sendmail` as cron and local programs call them: the real
commands as subprocesses, the real daemon delivering into Maildirs (or to a real aiosmtpd next hop
when the envelope sender is what is being looked at)."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

import pytest

from router.front.sendmail import UsageError, address_list
from router.spool import Spool
from router.spool.queue_file import parse
from tests.daemon import ROOT, message_in, read_only, wait_for
from tests.smtp_servers import AioServer

BIN = Path(sys.executable).parent
ME = "host.qrouter.test"
ENTRIES = {"qrouter-sendmail": [str(BIN / "qrouter-sendmail")], "qrouter sendmail": [str(BIN / "qrouter"), "sendmail"]}
FAST = ["--smtp-timeouts", "connect=2,greeting=3,helo=3,mail=3,rcpt=3,data=3,block=3,dot=3", "--min-backoff", "60"]


@pytest.fixture
def config(tmp_path) -> Path:
    """A config file naming the spool the daemons of `daemons` use, and `me`."""
    path = tmp_path / "qrouter.conf"
    path.write_text(f"queue-dir spool\nme {ME}\nworkers 3   # not read by sendmail\n")
    return path


def sendmail(*args: str, stdin: bytes = b"", entry: str = "qrouter-sendmail", **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*ENTRIES[entry], *args], input=stdin, capture_output=True, timeout=30, cwd=ROOT, **kwargs)


def queued(spool: Path) -> list[str]:
    """What is in incoming/ and tmp/: a failed sendmail must leave nothing in either."""
    return sorted(os.listdir(spool / "incoming")) + sorted(os.listdir(spool / "tmp"))


def ok(result: subprocess.CompletedProcess) -> None:
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), result.stderr.decode()


def submitted(content: bytes, added: int) -> bytes:
    """The message as handed to sendmail: without the Received: field (two lines) it puts first
    and the `added` fields after it (those of From:, Date: and Message-ID: that were missing).
    tests/test_submission.py checks what these fields hold."""
    assert content.startswith(b"Received: by "), content[:200]
    return content.split(b"\n", 2 + added)[-1]


# To and Cc with display names, a quoted comma, a group, a comment and a folded line; two Bcc
# fields, one folded over continuation lines with a tab and CRLF line ends; an address in To and
# Cc again; 8-bit text in a header and the body; body lines that look like header fields.
T_MESSAGE = (b"From: Alice <alice@example.org>\n"
             b"To: \"Doe, John\" <john@one.example>,\n"
             b"  Two <two@two.example>\n"
             b"Bcc: hidden@three.example\n"
             b"Subject: gr\xc3\xbc\xc3\x9fe\n"
             b"Cc: team: carol@one.example (Carol), john@one.example;\n"
             b"bcc: Secret <secret@three.example>,\r\n"
             b"\t<also@three.example>\r\n"
             b"X-After-Bcc: kept\n"
             b"\n"
             b"Bcc: body@nowhere.example\n"
             b"To: body@nowhere.example\n"
             b"..two dots and 8-bit \xe4\xf6\xfc\n")
T_EXPECTED = (b"From: Alice <alice@example.org>\n"
              b"To: \"Doe, John\" <john@one.example>,\n"
              b"  Two <two@two.example>\n"
              b"Subject: gr\xc3\xbc\xc3\x9fe\n"
              b"Cc: team: carol@one.example (Carol), john@one.example;\n"
              b"X-After-Bcc: kept\n"
              b"\n"
              b"Bcc: body@nowhere.example\n"
              b"To: body@nowhere.example\n"
              b"..two dots and 8-bit \xe4\xf6\xfc\n")


@pytest.mark.parametrize("entry", ENTRIES)
def test_t_reads_to_cc_bcc_and_takes_out_only_the_bcc_fields(daemons, config, entry):
    daemon = daemons()
    ok(sendmail("--config", str(config), "-t", "-i", "extra@one.example", stdin=T_MESSAGE, entry=entry))
    mailboxes = ["one.example/john", "two.example/two", "one.example/carol", "three.example/hidden",
                 "three.example/secret", "three.example/also", "one.example/extra"]
    wait_for(lambda: len(daemon.delivered()) == len(mailboxes), what="seven deliveries")
    daemon.wait_idle()
    for mailbox in mailboxes:  # john is in To: and Cc: and gets one copy
        assert [submitted(message_in(p), 2) for p in daemon.delivered(mailbox)] == [T_EXPECTED], mailbox
    assert len(daemon.delivered()) == len(mailboxes)
    assert not (daemon.mail / "nowhere.example").exists()


def test_without_t_the_header_is_not_read_and_nothing_is_changed(daemons, config):
    daemon = daemons()
    ok(sendmail("--config", str(config), "-i", "only@one.example", stdin=T_MESSAGE))
    [delivered] = wait_for(lambda: daemon.delivered(), what="delivery")
    assert submitted(message_in(delivered), 2) == T_MESSAGE  # Date: and Message-ID: added
    daemon.wait_idle()
    assert daemon.delivered() == [delivered]


def test_cron_like_invocation_through_a_sendmail_link(daemons, config, tmp_path):
    """What cron runs: `sendmail -FCronDaemon -i -B8BITMIME -oem -oi -t < message`, through a
    link named sendmail as an administrator would make it, the config found by $QROUTER_CONFIG."""
    daemon = daemons()
    links = tmp_path / "sbin"
    links.mkdir()
    (links / "sendmail").symlink_to(BIN / "qrouter-sendmail")
    message = (b"From: root (Cron Daemon)\n"
               b"To: root\n"
               b"Subject: Cron <root@host> /usr/local/bin/nightly\n"
               b"MIME-Version: 1.0\n"
               b"Content-Type: text/plain; charset=UTF-8\n"
               b"Content-Transfer-Encoding: 8bit\n"
               b"X-Cron-Env: <SHELL=/bin/sh>\n"
               b"\n"
               b"report line\n"
               b".\n"
               b"after a lone dot: K\xc3\xb6ln\n")
    (tmp_path / "message").write_bytes(message)
    env = {"PATH": f"{links}:/usr/bin:/bin", "QROUTER_CONFIG": str(config)}
    result = subprocess.run(["sh", "-c", "sendmail -FCronDaemon -i -B8BITMIME -oem -oi -t < message"],
                            capture_output=True, cwd=tmp_path, env=env, timeout=30)
    ok(result)
    [delivered] = wait_for(lambda: daemon.delivered(f"{ME}/root"), what="delivery to root")
    assert submitted(message_in(delivered), 2) == message  # Date: and Message-ID: added


def test_a_lone_dot_line_ends_the_message_unless_i(daemons, config):
    daemon = daemons()
    message = b"Subject: dots\n\nbefore\n..\n.x\n.\nafter\n"
    crlf = b"Subject: dots\r\n\r\nbefore\r\n.\r\nafter\r\n"
    ok(sendmail("--config", str(config), "plain@one.example", stdin=message))
    ok(sendmail("--config", str(config), "crlf@one.example", stdin=crlf))
    ok(sendmail("--config", str(config), "-i", "i@one.example", stdin=message))
    ok(sendmail("--config", str(config), "-oi", "oi@one.example", stdin=message))
    ok(sendmail("--config", str(config), "last@one.example", stdin=b"Subject: x\n\nend\n."))
    wait_for(lambda: len(daemon.delivered()) == 5, what="five deliveries")
    got = {p.parent.parent.name: submitted(message_in(p), 3) for p in daemon.delivered()}
    assert got == {"plain": b"Subject: dots\n\nbefore\n..\n.x\n", "crlf": b"Subject: dots\r\n\r\nbefore\r\n",
                   "i": message, "oi": message, "last": b"Subject: x\n\nend\n"}


def test_unqualified_recipients_get_at_me(daemons, config):
    daemon = daemons()
    ok(sendmail("--config", str(config), "root", "Ops <ops>, other@two.example",
                stdin=b"Subject: to root\n\nhello\n"))
    ok(sendmail("--config", str(config), "-t", stdin=b"To: webmaster (the web team)\nSubject: t\n\nhi\n"))
    wait_for(lambda: len(daemon.delivered()) == 4, what="four deliveries")
    assert sorted(str(p.parent.parent.relative_to(daemon.mail)) for p in daemon.delivered()) == [
        f"{ME}/ops", f"{ME}/root", f"{ME}/webmaster", "two.example/other"]


def test_sender_from_f_or_the_invoking_user(daemons, config):
    user = pwd.getpwuid(os.getuid()).pw_name
    cases = [(["-f", "alice@example.org"], "alice@example.org"),
             (["-fbob@example.org"], "bob@example.org"),
             (["-f", "<carol@example.org>"], "carol@example.org"),
             (["-f", "dave"], f"dave@{ME}"),
             (["-r", "erin@example.org"], "erin@example.org"),
             (["-f", ""], "<>"),
             (["-f<>"], "<>"),
             (["-F", "Full Name"], f"{user}@{ME}"),
             ([], f"{user}@{ME}")]
    with AioServer() as sink:
        daemon = daemons("--relayhost", f"127.0.0.1:{sink.port}", "--me", ME, *FAST)
        for number, (args, _) in enumerate(cases):
            ok(sendmail("--config", str(config), *args, "rcpt@example.net", stdin=f"Subject: {number}\n\nx\n".encode()))
        wait_for(lambda: len(sink.handler.messages) == len(cases), what="every message at the next hop")
    senders = {int(re.search(rb"^Subject: (\d+)\r$", m.content, re.MULTILINE).group(1)): m.mail_from
               for m in sink.handler.messages}
    assert senders == {number: sender for number, (_, sender) in enumerate(cases)}
    assert daemon.files("incoming") == daemon.files("deferred") == []


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(("args", "stdin", "complaint"), [
    (["-q"], b"", "option -q not recognized"),
    (["-bp"], b"", "-bp is not supported"),
    (["-oQ/tmp/q", "u@one.example"], b"x\n", "-oQ/tmp/q is not supported"),
    (["-f"], b"", "option -f requires argument"),
    ([], b"Subject: x\n\nx\n", "no recipients given"),
    (["a@@b.example"], b"x\n", "not a valid"),
    (["-f", "two words@example.org", "u@one.example"], b"x\n", "not a valid dot-string"),
    (["<>"], b"x\n", "only valid as a sender"),
    (["-t"], b"Subject: no recipients\n\nx\n", "none in To:, Cc: or Bcc:"),
    (["-t"], b"To: <open@one.example\n\nx\n", "To: header"),
    (["-t"], b"Cc: <a@one.example> <b@one.example>\n\nx\n", "Cc: header"),
    (["-N", "sometimes", "u@one.example"], b"x\n", "-N 'sometimes'"),
])
def test_usage_errors_exit_64_and_queue_nothing(tmp_path, config, entry, args, stdin, complaint):
    Spool(tmp_path / "spool").create()
    result = sendmail("--config", str(config), *args, stdin=stdin, entry=entry)
    assert result.returncode == 64
    assert complaint in result.stderr.decode()
    assert result.stdout == b""
    assert queued(tmp_path / "spool") == []


def test_a_spool_that_cannot_take_it_exits_75_and_the_caller_can_try_again(daemons, config):
    daemon = daemons(start=False)
    spool = Spool(daemon.spool)
    spool.create()
    message = b"Subject: later\n\nkept by the caller\n"
    with read_only(daemon.spool):
        result = sendmail("--config", str(config), "-t", "u@one.example", stdin=b"To: v@one.example\n" + message)
        assert result.returncode == 75
        assert b"Read-only file system" in result.stderr and result.stdout == b""
        # a spool that is not there yet is made, as `qrouter enqueue` makes it; here it cannot be
        missing = sendmail("--queue-dir", str(daemon.spool / "no-such-spool"), "u@one.example", stdin=message)
        assert missing.returncode == 75 and b"Read-only file system" in missing.stderr
    assert queued(daemon.spool) == []
    assert not (daemon.spool / "no-such-spool").exists()
    ok(sendmail("--config", str(config), "-t", "u@one.example", stdin=b"To: v@one.example\n" + message))
    daemon.start()
    wait_for(lambda: len(daemon.delivered()) == 2, what="two deliveries")
    assert sorted(p.parent.parent.name for p in daemon.delivered()) == ["u", "v"]


def test_queue_dir_flag_verbose_and_a_bad_config(daemons, tmp_path):
    daemon = daemons()
    ok(sendmail("--queue-dir", str(daemon.spool), "-f", "a@example.org", "u@one.example", stdin=b"x\n"))
    wait_for(lambda: daemon.delivered("one.example/u"), what="delivery")
    verbose = sendmail("--queue-dir", str(daemon.spool), "-v", "-f", "a@example.org", "w@one.example", stdin=b"y\n")
    assert verbose.returncode == 0 and verbose.stdout == b""
    queue_id = verbose.stderr.decode().split("queued as ")[1].strip()
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="the verbose one delivered")
    bad = tmp_path / "bad.conf"
    bad.write_text("me host.example\nspool-group no-such-group-here\n")
    result = sendmail("--config", str(bad), "u@one.example", stdin=b"x\n")
    assert result.returncode == 78
    assert f"{bad}:2: spool-group: no such group" in result.stderr.decode()


def test_dsn_options_go_into_the_queue_file(tmp_path, config):
    """-N, -R and -V as `qrouter` keeps them for the next hop (read from the queue file: no daemon runs)."""
    Spool(tmp_path / "spool").create()
    ok(sendmail("--config", str(config), "-N", "success,failure", "-R", "hdrs", "-V", "job-42",
                "a@one.example", "b@two.example", stdin=b"Subject: dsn\n\nx\n"))
    [name] = os.listdir(tmp_path / "spool" / "incoming")
    stored = parse((tmp_path / "spool" / "incoming" / name).read_bytes())
    assert [(r.address, r.notify) for r in stored.recipients] == [("a@one.example", "SUCCESS,FAILURE"),
                                                                  ("b@two.example", "SUCCESS,FAILURE")]
    assert (stored.ret, stored.envid, submitted(stored.message, 3)) == ("HDRS", "job-42", b"Subject: dsn\n\nx\n")


@pytest.mark.parametrize(("text", "addresses"), [
    ("a@[IPv6:::1], b@x.test", ["a@[IPv6:::1]", "b@x.test"]),
    ('"a,b:c;d<e>(f)"@x.test', ['"a,b:c;d<e>(f)"@x.test']),
    ("Name (with: a comment, (nested)) <a@[x-tag:text]>", ["a@[x-tag:text]"]),
    ("undisclosed-recipients:;", []),
    ('team: "Doe, J." <j@x.test>, k@[192.0.2.1];, l@x.test', ["j@x.test", "k@[192.0.2.1]", "l@x.test"]),
    ("Dr. J. O'Brien <j@x.test>", ["j@x.test"]),
    ("j@x.test <j@x.test>, [Ops] Team <ops@x.test>", ["j@x.test", "ops@x.test"]),  # display names as found
    ("<@r.test,@s.test:a@x.test>", ["@r.test,@s.test:a@x.test"]),  # all within <...> is parse_path's
])
def test_address_list_splits_only_between_addresses(text, addresses):
    assert address_list(text) == addresses


@pytest.mark.parametrize(("text", "complaint"), [
    ("a@x.test\u2028b@x.test: c@x.test", "group name 'a@x.test\\u2028b@x.test' is not a phrase"),
    ("<a@x.test> <b@x.test>", "two <addresses> in one entry"),
    ("<a@x.test>: b@x.test", "':' after <address>"),
    ("a@x.test (open", "'(' without ')'"),
    ("a@[x:y, b@x.test", "'[' without ']'"),
    ('"a@x.test, b@x.test', "'\"' without '\"'"),
    ("a@x.test), b@x.test", "')' out of place"),
])
def test_address_list_refuses_what_it_would_have_to_guess(text, complaint):
    with pytest.raises(UsageError, match=re.escape(complaint)):
        address_list(text, "recipient")
