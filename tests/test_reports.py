"""Reports to the sender through the real daemon: non-delivery reports, success and delay
notices, NOTIFY and RET, expiry, the hop limit, double bounces. Every report is parsed with
Python's email package and given to flufl.bounce, the detector Mailman 3 runs."""

from __future__ import annotations

import email
import email.policy
import os
import re
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from flufl.bounce import all_failures

from router.spool import Spool
from router.spool.queue_file import FAILED, parse
from tests.daemon import contents, message_in, wait_for
from tests.smtp_servers import AioServer, Recorder
from tests.unix_users import script
from workers.report import DELAYED, Notice, build

SENDER = "alice@sender.example"
ORIGINAL = (b"From: Alice <alice@sender.example>\nTo: many\nSubject: the original\n"
            b"Message-ID: <original.1@sender.example>\n\nthe body\n")
REJECTS = {"gone@smtp.example": "550 5.1.1 <gone@smtp.example>: no such user",
           "denied@smtp.example": "553 5.7.1 relaying denied"}


def reports(daemon, mailbox: str = "sender.example/alice") -> list[EmailMessage]:
    """The reports delivered to a sender's Maildir, parsed; their envelope sender must be <>."""
    found = []
    for path in daemon.delivered(mailbox):
        assert path.read_bytes().startswith(b"Return-Path: <>\n"), "a report's envelope sender is <>"
        found.append(email.message_from_bytes(message_in(path), policy=email.policy.default))
    return found


def status_groups(report: EmailMessage) -> list[dict[str, str]]:
    """The message/delivery-status part as its groups of fields (per message, per recipient)."""
    part = next(p for p in report.walk() if p.get_content_type().endswith("delivery-status"))
    text = part.get_payload(decode=False) if isinstance(part.get_payload(), str) else \
        "\n\n".join(str(sub) for sub in part.get_payload())
    groups = []
    text = re.sub(r"\n[ \t]+", " ", text.replace("\r\n", "\n"))  # fields folded when parsed are unfolded
    for block in re.split(r"\n\s*\n", text.strip()):
        groups.append(dict(line.split(": ", 1) for line in block.splitlines() if ": " in line))
    return groups


def policy_args(tmp_path: Path, *rules: str) -> list[str]:
    (tmp_path / "transports").write_text("".join(f"{rule}\n" for rule in rules)
                                         + f"sender.example queue/maildir {tmp_path}/mail/%d/%u\n")
    return ["--transports", str(tmp_path / "transports"), "--send-ndr", "yes", "--min-backoff", "0.5",
            "--max-backoff", "0.5"]


def test_two_of_three_failing_make_one_report_a_person_and_a_program_can_read(daemons, tmp_path):
    with AioServer(Recorder(rcpt=REJECTS)) as sink:
        daemon = daemons(*policy_args(tmp_path, f"smtp.example [127.0.0.1]:{sink.port}"))
        queue_id = Spool(daemon.spool).enqueue(SENDER, ["ok@smtp.example", "gone@smtp.example", "denied@smtp.example"],
                                               ORIGINAL, envid="env-42", notify="")
        [report] = wait_for(lambda: reports(daemon), what="the report")
    # each line is logged after its file is in place: the report queued, then delivered
    report_id = wait_for(lambda: re.search(rf"{queue_id}: sender non-delivery notification: (\S+)", daemon.log()),
                         what="the report queued")[1]
    wait_for(lambda: f"{report_id}: to=<{SENDER}>" in daemon.log(), what="the report's delivery")
    assert report["From"] == f"Mail Delivery System <MAILER-DAEMON@{hostname(daemon)}>"
    assert report["To"] == SENDER and report["Auto-Submitted"] == "auto-replied"
    assert report["In-Reply-To"] == report["References"] == "<original.1@sender.example>"
    assert report["X-Failed-Recipients"] == "gone@smtp.example, denied@smtp.example"
    assert report.get_content_type() == "multipart/report" and report.get_param("report-type") == "delivery-status"
    text, status, returned = report.iter_parts()
    assert status.get_content_type() == "message/delivery-status"
    readable = " ".join(text.get_content().split())
    assert "could not be delivered" in readable and "550 5.1.1 <gone@smtp.example>: no such user" in readable
    assert "ok@smtp.example" not in readable
    message, *recipients = status_groups(report)
    assert message["Reporting-MTA"] == f"dns; {hostname(daemon)}"
    assert message["X-Qrouter-Queue-ID"] == queue_id and message["Original-Envelope-Id"] == "env-42"
    assert "Arrival-Date" in message
    assert [(r["Final-Recipient"], r["Action"], r["Status"], r["Remote-MTA"], r["Diagnostic-Code"])
            for r in recipients] == [
        ("rfc822; gone@smtp.example", "failed", "5.1.1", "dns; 127.0.0.1",
         "smtp; 550 5.1.1 <gone@smtp.example>: no such user"),
        ("rfc822; denied@smtp.example", "failed", "5.7.1", "dns; 127.0.0.1", "smtp; 553 5.7.1 relaying denied")]
    assert all("Last-Attempt-Date" in r for r in recipients)
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_payload()[0].as_bytes().replace(b"\r\n", b"\n").endswith(b"the body\n")
    assert permanent(report) == {b"gone@smtp.example", b"denied@smtp.example"}


def permanent(report: EmailMessage) -> frozenset[bytes]:
    """The recipients flufl.bounce finds failed for good; it must find none failed for now."""
    temporary, failed = all_failures(report)
    assert temporary == frozenset()
    return failed


def hostname(daemon) -> str:
    return re.search(r"MAILER-DAEMON@([^>]+)>", message_in(daemon.delivered("sender.example/alice")[0]).decode())[1]


AGENT = 'cat >/dev/null; [ "$RECIPIENT" = gone@smtp.example ] || exit 0; echo no such user here; exit 67\n'


@pytest.mark.parametrize("how", ["smtp-550", "lmtp-550", "agent", "expiry"])
def test_bounce_processors_find_exactly_the_failed_recipients(daemons, tmp_path, world_dir, how):
    handler = Recorder(rcpt=REJECTS, lmtp={"gone@smtp.example": "550 5.1.1 no such mailbox"})
    with AioServer(handler, lmtp=how == "lmtp-550") as sink:
        hop = {"smtp-550": f"[127.0.0.1]:{sink.port}", "lmtp-550": f"lmtp:127.0.0.1:{sink.port}",
               "agent": f"|{script(world_dir, 'agent', AGENT)}",
               "expiry": "queue/retry 4.2.2 mailbox full"}[how]
        extra = ["--max-age", "0.00002"] if how == "expiry" else []
        daemon = daemons(*policy_args(tmp_path, f"smtp.example {hop}"), *extra)
        Spool(daemon.spool).enqueue(SENDER, ["ok@smtp.example" if how != "expiry" else "x@sender.example",
                                             "gone@smtp.example"], ORIGINAL)
        [report] = wait_for(lambda: reports(daemon), what="the report")
    assert permanent(report) == {b"gone@smtp.example"}
    [failed] = status_groups(report)[1:]
    expected = {"smtp-550": "5.1.1", "lmtp-550": "5.1.1", "agent": "5.1.1", "expiry": "4.4.7"}[how]
    assert (failed["Action"], failed["Status"]) == ("failed", expected)
    if how == "agent":
        assert failed["Diagnostic-Code"] == "x-unix; no such user here"
    if how == "expiry":
        assert "expired after" in failed["Diagnostic-Code"] and "mailbox full" in failed["Diagnostic-Code"]


def test_no_report_for_mail_from_the_null_sender_or_when_notify_says_never(daemons, tmp_path):
    daemon = daemons(*policy_args(tmp_path, "fail.example queue/error 5.1.1 no such user"))
    spool = Spool(daemon.spool)
    null = spool.enqueue("", ["x@fail.example"], ORIGINAL)
    never = spool.enqueue(SENDER, ["y@fail.example"], ORIGINAL, notify="NEVER")
    wait_for(lambda: f"{null}: removed" in daemon.log() and f"{never}: removed" in daemon.log(), what="both done")
    assert f"{null}: no report for 1 recipient(s): the sender is <>" in daemon.log()
    assert "notification" not in daemon.log()
    assert daemon.files("incoming") == [] and not reports(daemon)


def test_notify_success_to_a_server_without_dsn_gets_a_success_report(daemons, tmp_path):
    with AioServer(Recorder(without=["DSN"])) as sink:
        daemon = daemons(*policy_args(tmp_path, f"smtp.example [127.0.0.1]:{sink.port}"))
        queue_id = Spool(daemon.spool).enqueue(SENDER, ["ok@smtp.example"], ORIGINAL, notify="SUCCESS,FAILURE")
        [report] = wait_for(lambda: reports(daemon), what="the success report")
    wait_for(lambda: f"{queue_id}: sender delivery status notification:" in daemon.log(), what="the report queued")
    assert report["Subject"] == "Successful Mail Delivery Report" and "X-Failed-Recipients" not in report
    [relayed] = status_groups(report)[1:]
    assert (relayed["Final-Recipient"], relayed["Action"], relayed["Status"]) == (
        "rfc822; ok@smtp.example", "relayed", "2.0.0")
    assert all_failures(report) == (frozenset(), frozenset())


@pytest.mark.parametrize("case", ["ret-hdrs", "two-megabytes"])
def test_only_the_header_comes_back_when_asked_or_when_the_message_is_large(daemons, tmp_path, case):
    daemon = daemons(*policy_args(tmp_path, "fail.example queue/error 5.1.1 no such user"))
    body = ORIGINAL + (b"x" * 999 + b"\n") * 2048 if case == "two-megabytes" else ORIGINAL
    Spool(daemon.spool).enqueue(SENDER, ["x@fail.example"], body, ret="HDRS" if case == "ret-hdrs" else "")
    [report] = wait_for(lambda: reports(daemon), what="the report")
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_content().replace("\r\n", "\n").rstrip("\n") == ORIGINAL.split(b"\n\n")[0].decode()
    assert permanent(report) == {b"x@fail.example"}


def test_a_report_that_fails_itself_is_dropped_and_logged_not_reported(daemons, tmp_path):
    daemon = daemons(*policy_args(tmp_path, "fail.example queue/error 5.1.1 no such user",
                                  "nowhere.example queue/error 5.1.2 no such domain"), "--archive-failed", "yes")
    queue_id = Spool(daemon.spool).enqueue("bob@nowhere.example", ["x@fail.example"], ORIGINAL)
    report_id = re.search(rf"{queue_id}: sender non-delivery notification: (\S+)",
                          wait_for(lambda: re.search(r".*notification.*", daemon.log()) and daemon.log(),
                                   what="the report"))[1]
    logged = wait_for(lambda: re.search(rf"{report_id}: no report for 1 recipient\(s\): the sender is <>",
                                        daemon.log()), what="the report's failure")
    assert logged
    daemon.wait_idle()
    assert daemon.log().count("notification") == 1, "no report about the report"
    archived = parse((daemon.spool / "archive" / report_id).read_bytes())
    assert [(r.address, r.state, r.dsn) for r in archived.recipients] == [("bob@nowhere.example", FAILED, "5.1.2")]


def test_double_bounces_go_to_the_bounce_notice_recipient_once(daemons, tmp_path):
    daemon = daemons(*policy_args(tmp_path, "fail.example queue/error 5.1.1 no such user"),
                     "--bounce-notice-recipient", "postmaster@sender.example")
    queue_id = Spool(daemon.spool).enqueue("", ["x@fail.example"], ORIGINAL)
    [notice] = wait_for(lambda: reports(daemon, "sender.example/postmaster"), what="the double-bounce notice")
    wait_for(lambda: f"{queue_id}: undeliverable mail notification:" in daemon.log(), what="the notice queued")
    assert permanent(notice) == {b"x@fail.example"}
    daemon.wait_idle()
    [report_id] = re.findall(r"undeliverable mail notification: (\S+)", daemon.log())
    assert re.search(rf"{report_id}: to=<postmaster@sender.example>, .*status=sent", daemon.log())


def test_a_delay_warning_goes_once_even_across_kill_9_and_a_restart(daemons, tmp_path):
    args = [*policy_args(tmp_path, "slow.example queue/retry 4.2.1 try later"), "--delay-warning", "0.0003"]
    daemon = daemons(*args)
    queue_id = Spool(daemon.spool).enqueue(SENDER, ["x@slow.example"], ORIGINAL)
    [warning] = wait_for(lambda: reports(daemon), what="the delay warning")
    wait_for(lambda: f"{queue_id}: sender delay notification:" in daemon.log(), what="the warning queued")
    deferred = daemon.spool / "deferred" / queue_id
    # killed before the message is filed with its warning, a second warning would be the design's
    # "at worst" (workers/notify.py): kill once the warning is on record
    wait_for(lambda: (data := contents(deferred)) and parse(data).warned, what="the warning recorded")
    daemon.kill()  # kill -9
    daemon.start()
    attempts = parse(wait_for(lambda: contents(deferred), what="the message in deferred/")).attempts
    wait_for(lambda: (data := contents(deferred)) and parse(data).attempts >= attempts + 3, what="three more attempts")
    assert len(reports(daemon)) == 1 and daemon.log().count("delay notification") == 1
    assert warning["Subject"] == "Delayed Mail (still being retried)"
    [delayed] = status_groups(warning)[1:]
    assert (delayed["Action"], delayed["Status"]) == (DELAYED, "4.2.1") and "Will-Retry-Until" in delayed
    assert all_failures(warning)[1] == frozenset(), "a warning is no failure"
    notification, _, returned = warning.iter_parts()
    assert returned.get_content_type() == "text/rfc822-headers", "a warning returns the header only, as Postfix"
    assert returned.get_content().replace("\r\n", "\n").rstrip("\n") == ORIGINAL.split(b"\n\n")[0].decode()
    assert "in the end. Its header is attached below." in notification.get_content()
    assert notification.get_content_charset() == "us-ascii" and notification["Content-Transfer-Encoding"] == "7bit"
    data = wait_for(lambda: contents(deferred), what="the message in deferred/")
    assert parse(data).warned and data.startswith(b"qrouter-queue-file 3\n")


@pytest.mark.parametrize("archive", [False, True])
def test_expiry_reports_then_removes_or_archives(daemons, tmp_path, archive):
    daemon = daemons(*policy_args(tmp_path, "slow.example queue/retry 4.2.1 try later"), "--max-age", "0.00002",
                     "--archive-failed", "yes" if archive else "no")
    queue_id = Spool(daemon.spool).enqueue(SENDER, ["x@slow.example"], ORIGINAL)
    wait_for(lambda: reports(daemon), what="the report")
    wait_for(lambda: f"{queue_id}: {'archived' if archive else 'removed'}" in daemon.log(), what="filing away")
    assert daemon.files("deferred") == []
    if archive:
        [rcpt] = parse((daemon.spool / "archive" / queue_id).read_bytes()).recipients
        assert (rcpt.state, rcpt.dsn, rcpt.reported) == (FAILED, "4.4.7", True)
    else:
        assert daemon.files("archive") == []


def test_archive_max_age_prunes_the_archive(daemons, tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    old, young = spool.path("archive", "old"), spool.path("archive", "young")
    for path in (old, young):
        Path(path).write_bytes(b"archived\n")
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    daemon = daemons("--archive-max-age", "2")
    wait_for(lambda: "removed 1 message(s) archived more than 2 days ago (archive-max-age)" in daemon.log(),
             what="the pruning")
    assert daemon.files("archive") == ["young"]


def test_a_message_past_the_hop_limit_is_a_loop(daemons, tmp_path):
    daemon = daemons(*policy_args(tmp_path), "--hopcount-limit", "5")
    looped = b"".join(b"Received: from hop%d\n" % n for n in range(4)) + b"Delivered-To: a@b.example\n" * 2 + ORIGINAL
    queue_id = Spool(daemon.spool).enqueue(SENDER, ["x@elsewhere.example"], looped)
    assert wait_for(lambda: re.search(rf"{queue_id}: to=<x@elsewhere\.example>, relay=none, .*dsn=5\.4\.6, "
                                      r"status=bounced \(mail loop: the message has 6 Received: and Delivered-To: "
                                      r"header fields, more than hopcount-limit 5\)", daemon.log()), what="the loop")
    [report] = wait_for(lambda: reports(daemon), what="the report")
    assert permanent(report) == {b"x@elsewhere.example"}
    assert daemon.delivered("elsewhere.example/*") == []


def test_a_report_sent_by_smtp_parses_as_the_one_in_a_maildir(daemons, tmp_path):
    with AioServer(Recorder()) as sink:
        (tmp_path / "transports").write_text(f"fail.example queue/error 5.1.1 no such user\n"
                                             f"sender.example [127.0.0.1]:{sink.port}\n")
        daemon = daemons("--transports", str(tmp_path / "transports"), "--send-ndr", "yes")
        Spool(daemon.spool).enqueue(SENDER, ["x@fail.example"], ORIGINAL)
        [received] = wait_for(lambda: sink.handler.messages, what="the report over SMTP")
    assert (received.mail_from, received.rcpt_tos) == ("<>", [SENDER])
    report = email.message_from_bytes(received.content, policy=email.policy.default)
    assert permanent(report) == {b"x@fail.example"}
    assert [(g["Final-Recipient"], g["Status"]) for g in status_groups(report)[1:]] == [
        ("rfc822; x@fail.example", "5.1.1")]


def test_unicode_addresses_get_the_global_forms():
    from router.spool.queue_file import Recipient

    data = build(queue_id="6618577E5E7CC-7E37-1", arrival=time.time(), sender="jörg@bücher.example", envid="",
                 ret="", message=ORIGINAL, notices=[Notice(Recipient("zoë@bücher.example", dsn="5.1.1",
                                                                     reply="no such user"), "failed")],
                 me="mx.example", to="jörg@bücher.example", now=time.time(), size_limit=50_000)
    report = email.message_from_bytes(data, policy=email.policy.default)
    types = [part.get_content_type() for part in report.iter_parts()]
    assert types == ["text/plain", "message/global-delivery-status", "message/global"]
    assert "Final-Recipient: utf-8; zoë@bücher.example" in data.decode()

