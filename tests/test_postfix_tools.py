"""The log read by the tools Postfix administrators run on theirs: Debian's pflogsumm, and
logwatch's postfix service, on the log of a real daemon run whose every count the test knows.

The run: mail sent over SMTP, a recipient the server refuses (550: bounced, with a report to the
sender), recipients it keeps answering 450 (deferred, one of those messages then held), a message
past max-age (deferred, expired, reported), a bounce from elsewhere (sender <>). Every message
comes in through the spool's front door; the reports are qrouter's own.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from router.spool import Spool
from tests.daemon import Daemon, message_in, reachable, wait_for
from tests.smtp_servers import AioServer, Recorder
from tests.test_queue_commands import arrived_ago, queue

GONE = "550 5.1.1 <gone@ok.example>: no such user"
BUSY = "450 4.2.0 <busy@ok.example>: mailbox busy"
QUEUE_ID = re.compile(r"\b[0-9A-F]{13}-[0-9A-F]+-[0-9A-F]+\b")
LINE_START = re.compile(r"[A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d \S+ qrouter/([a-z]+)\[\d+\]: ")


@dataclass
class Run:
    """What the test knows of the run: the log, and the counts a summary of it must show."""

    log: Path
    received: int
    delivered: int
    deferred: int
    bounced: int
    bytes_received: int
    bytes_delivered: int
    senders: int
    sending_domains: int
    recipients: int
    recipient_domains: int
    relay: str


def message(subject: str) -> bytes:
    return f"From: someone\nSubject: {subject}\nMessage-ID: <{subject}@sender.example>\n\n{subject} body\n".encode()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """One daemon run with its log file: sent, bounced, deferred, held, expired, reported."""
    tmp = reachable(tmp_path_factory.mktemp("postfix-tools"), 0o1777)
    with AioServer(Recorder(rcpt={"gone@ok.example": GONE, "busy@ok.example": BUSY})) as sink:
        (tmp / "transports").write_text(f"ok.example [127.0.0.1]:{sink.port}\n"
                                        f"sender.example queue/maildir {tmp}/mail/%d/%u\n")
        daemon = Daemon(tmp, "--transports", str(tmp / "transports"), "--send-ndr", "yes", "--max-age", "1",
                        "--min-backoff", "3600").start()
        try:
            spool = Spool(daemon.spool)
            sent = [("alice@sender.example", ["a@ok.example", "b@ok.example"], message("two")),
                    ("bob@sender.example", ["c@ok.example", "gone@ok.example"], message("one-bounces")),
                    ("", ["d@ok.example"], message("a-bounce-from-elsewhere"))]
            waiting = [("alice@sender.example", ["busy@ok.example"], message("held-later")),
                       ("dave@other.example", ["busy@ok.example"], message("deferred"))]
            old = ("carol@sender.example", ["busy@ok.example"], message("expires"))
            ids = [spool.enqueue(sender, rcpts, data) for sender, rcpts, data in sent + waiting]
            ids.append(spool.enqueue(*old[:2], old[2], queue_id=arrived_ago(2 * 86400)))
            done = ids[:3] + ids[5:]
            wait_for(lambda: all(f"{i}: removed" in daemon.log() for i in done), what="the finished messages")
            wait_for(lambda: len(daemon.delivered("sender.example/*")) == 2, what="the two reports")
            wait_for(lambda: daemon.files("deferred") == sorted(ids[3:5]), what="the deferred messages")
            reports = re.findall(r"sender non-delivery notification: (\S+)", daemon.log())
            wait_for(lambda: all(f"{i}: removed" in daemon.log() for i in reports), what="the reports' removal")
            assert queue(daemon, "hold", ids[3])[0] == 0
            wait_for(lambda: f"{ids[3]}: held" in daemon.log(), what="the hold")
        finally:
            assert daemon.stop() == 0
    report_sizes = [len(message_in(path)) for path in daemon.delivered("sender.example/*")]
    sizes = [len(data) for _, _, data in sent + waiting + [old]]
    return Run(daemon.log_path, received=6, delivered=2 + 1 + 1 + len(report_sizes), deferred=3, bounced=1,
               bytes_received=sum(sizes), bytes_delivered=2 * sizes[0] + sizes[1] + sizes[2] + sum(report_sizes),
               senders=5, sending_domains=3, recipients=6, recipient_domains=2,
               relay=f"127.0.0.1[127.0.0.1]:{sink.port}")


def pflogsumm(*args: str) -> str:
    result = subprocess.run(["pflogsumm", "--syslog-name=qrouter", *args], capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout


def section(report: str, title: str) -> str:
    """The lines of a report's section, from its title to the first empty line after them."""
    return report.split(title, 1)[1].strip("\n").split("\n\n", 1)[0]


def grand_totals(report: str) -> dict[str, int]:
    """pflogsumm's Grand Totals, by label: `received`, `bytes delivered`, `senders`..."""
    totals = report.split("Grand Totals", 1)[1].split("Per-Hour Traffic Summary", 1)[0]
    return {label.strip(): int(number) for number, label in re.findall(r"^ +(\d+) +([a-z][a-z /]+?)(?: \(|$)",
                                                                        totals, re.MULTILINE)}


def test_every_line_begins_as_syslog_writes_it_and_names_its_speaker(run):
    lines = run.log.read_text().splitlines()
    speakers = [LINE_START.match(line) for line in lines]
    assert all(speakers), [line for line, speaker in zip(lines, speakers, strict=True) if not speaker]
    assert {"pickup", "cleanup", "qmgr", "smtp", "bounce", "maildir"} <= {s[1] for s in speakers if s}
    log = run.log.read_text()
    assert re.search(r"qrouter/cleanup\[\d+\]: \S+: message-id=<two@sender\.example>$", log, re.MULTILINE)
    assert re.search(r"qrouter/qmgr\[\d+\]: \S+: from=<alice@sender\.example>, size=\d+, nrcpt=2 \(queue active\)$",
                     log, re.MULTILINE)
    assert re.search(r"qrouter/smtp\[\d+\]: \S+: to=<a@ok\.example>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, "
                     r"delay=[\d.]+, delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, status=sent \(250 2\.0\.0 "
                     r"queued as 4711\), attempts=1$", log, re.MULTILINE)


def test_pflogsumm_counts_what_the_run_did(run):
    report = pflogsumm(str(run.log))
    totals = grand_totals(report)
    assert {label: totals[label] for label in ("received", "delivered", "forwarded", "deferred", "bounced",
                                                "rejected", "held", "bytes received", "bytes delivered",
                                                "senders", "sending hosts/domains", "recipients",
                                                "recipient hosts/domains")} == {
        "received": run.received, "delivered": run.delivered, "forwarded": 0, "deferred": run.deferred,
        "bounced": run.bounced, "rejected": 0, "held": 0, "bytes received": run.bytes_received,
        "bytes delivered": run.bytes_delivered, "senders": run.senders, "sending hosts/domains": run.sending_domains,
        "recipients": run.recipients, "recipient hosts/domains": run.recipient_domains}, report
    assert re.search(rf"\({run.deferred} +deferrals\)", report), report
    delivery = section(report, "Host/Domain Summary: Message Delivery")
    assert re.search(r"^ +4 +\d+ +3 .* ok\.example$", delivery, re.MULTILINE), delivery
    assert re.search(r"^ +2 +\d+ +0 .* sender\.example$", delivery, re.MULTILINE), delivery
    bounces = section(report, "message bounce detail (by relay)")
    assert run.relay in bounces and "no such user" in bounces, bounces
    deferrals = section(report, "message deferral detail")
    assert re.search(r"smtp \(total: 3\)", deferrals) and "mailbox busy" in deferrals, deferrals


def today_finds_it_all(log: Path, today: str) -> None:
    """`pflogsumm -d today` picks its lines by their time stamps: on a log of today, it counts all."""
    if not log.read_text().startswith(today):
        pytest.fail(f"the log does not begin today ({today!r}): run the test again, away from midnight")
    assert grand_totals(pflogsumm("-d", "today", str(log))) == grand_totals(pflogsumm(str(log)))


def test_pflogsumm_finds_today_by_the_syslog_time_stamps(run):
    today_finds_it_all(run.log, time.strftime("%b %e "))  # the day padded with a space, as syslog writes it


def test_pflogsumm_reads_rfc3339_time_stamps(daemons):
    daemon = daemons("--log-time", "rfc3339")
    spool = Spool(daemon.spool)
    ids = [spool.enqueue("a@sender.example", ["u@example.org", "v@example.org"], message(f"m{n}")) for n in range(2)]
    wait_for(lambda: all(f"{i}: removed" in daemon.log() for i in ids), what="the deliveries")
    assert daemon.stop() == 0
    lines = daemon.log().splitlines()
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d \S+ qrouter/[a-z]+\[\d+\]: ")
    assert all(stamp.match(line) for line in lines), lines
    totals = grand_totals(pflogsumm(str(daemon.log_path)))
    assert (totals["received"], totals["delivered"], totals["senders"], totals["recipients"]) == (2, 4, 1, 2), totals
    today_finds_it_all(daemon.log_path, time.strftime("%Y-%m-%dT"))


def logwatch(log: str, place: Path) -> str:
    """The report of logwatch's postfix service on `log` (as its mail.log), told the program name
    by a service config, as an administrator would in /etc/logwatch/conf/services/postfix.conf;
    here in a config directory of the test's own, mounted over /etc/logwatch in a mount
    namespace of its own, so that the machine's stays as it is."""
    services, logs = place / "etc" / "conf" / "services", place / "logs"
    services.mkdir(parents=True)
    logs.mkdir()
    (services / "postfix.conf").write_text('*OnlyService = "qrouter/[-\\w]*"\n$postfix_Syslog_Name = "qrouter"\n')
    (logs / "mail.log").write_text(log)
    result = subprocess.run(["unshare", "--mount", "sh", "-c", 'mount --bind "$1" /etc/logwatch && exec logwatch '
                             '--service postfix --logdir "$2" --range All --detail 10 --output stdout',
                             "sh", str(place / "etc"), str(logs)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def logwatch_counts(report: str) -> dict[str, int]:
    """The summary's lines of logwatch's postfix service: `Sent via SMTP`, `Deferred`... by label,
    the exact number at the end of the line (`3,999` where the first column has `3.905K`), or the
    first column where the end has a percentage."""
    summary = report.split("****** Summary", 1)[1].split("****** Detail", 1)[0]
    return {label: int((last if re.fullmatch(r"[\d,]+", last) else first).replace(",", "")) for first, label, last
            in re.findall(r"^ +(\S+) +([A-Z][A-Za-z ()]+?) {2,}(\S+)$", summary, re.MULTILINE)}


def test_logwatch_reads_the_run_as_postfix_but_for_qrouters_queue_ids(run, tmp_path):
    """What blocks logwatch's postfix service: it knows a queue id only in Postfix's forms (short,
    `[A-Z0-9]+`; or long, with $postfix_Enable_Long_Queue_Ids, `[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]+`),
    and has no setting for another; qrouter's ids have hyphens, so every message line is left
    unmatched. Take the hyphens out of the ids, changing nothing else, and it counts the run."""
    as_logged = logwatch(run.log.read_text(), tmp_path / "as-logged")
    assert "****** Summary" not in as_logged
    unmatched = as_logged.split("**Unmatched Entries**", 1)[1]
    assert len(re.findall(r"qrouter/smtp\[\d+\]: \S+: to=<", unmatched)) == 4 + 3 + 1, as_logged

    counts = logwatch_counts(logwatch(QUEUE_ID.sub(lambda id: id[0].replace("-", ""), run.log.read_text()),
                                      tmp_path / "hex-ids"))
    bounced = sum(number for label, number in counts.items() if label.startswith("Bounced"))
    assert (counts["Accepted"], counts["Bytes accepted"], counts["Sent via SMTP"] + counts["Delivered"],
            counts["Deferred"], bounced, counts["Notifications sent"], counts["Removed from queue"]) == (
        run.received, run.bytes_received, run.delivered, run.deferred, run.bounced, 2, 6), counts
