"""SMTP TLS reporting (RFC 8460) through the real daemon: MX routing by a real DNS server to
aiosmtpd servers whose TLS passes or fails (a certificate for another name, an expired one, no
STARTTLS at all), the `_smtp._tls` TXT records on that DNS server, the reports delivered by mail
(queued in the daemon's own spool, taken by an aiosmtpd sink) and POSTed to a loopback HTTPS
server with a certificate from a test CA.

A day cannot be made to pass in a test: `end_the_day` does to the spool what midnight UTC does,
it makes the sessions counted today those of a day that is over (their file is named after it).
"""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import gzip
import json
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

from policy.tls_report import parse_record
from router.spool import Spool
from router.spool.queue_file import PENDING
from tests.daemon import DAEMON_USER, qrouter, reachable, wait_for
from tests.dns_server import DNSServer
from tests.smtp_servers import AioServer, free_port
from tests.test_smtp_tls_auth import FAST, ME, Sink, deferred, delivered, enqueue
from workers.tls_outcomes import Recorder

REPORTS = "tlsrpt@reports.test"
BODY = b"Subject: t\r\n\r\nbody\r\n"


class Receiver:
    """An HTTPS server on loopback taking reports by POST: each request is kept (path, headers,
    body); the answers are `statuses` in turn, then 200."""

    def __init__(self, ca: trustme.CA, host: str = "127.0.0.5", statuses: tuple[int, ...] = ()) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.statuses = list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((self.path, dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(host).configure_cert(context)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://{host}:{self.server.server_address[1]}/tlsrpt"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> tuple[trustme.CA, str]:
    """A test CA the daemon trusts, for SMTP (smtp-tls-ca) and HTTPS (tls-report-ca), and its file."""
    authority = trustme.CA()
    path = reachable(tmp_path_factory.mktemp("pki")) / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, str(path)


def server_context(authority: trustme.CA, name: str, expired: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    issued = authority.issue_cert(name, not_before=past - datetime.timedelta(days=30), not_after=past) if expired \
        else authority.issue_cert(name)
    issued.configure_cert(context)
    return context


def zone(rua_partner: str, rua_other: str) -> str:
    """partner.test (a good certificate), other.test (one for another name), old.test (an expired
    one), plain.test (no STARTTLS) and reports.test, where the mail reports go (no STARTTLS)."""
    return f"""
partner.test. 60 IN MX 10 mx.partner.test.
mx.partner.test. 60 IN A 127.0.0.2
_smtp._tls.partner.test. 60 IN TXT "v=TLSRPTv1; rua={rua_partner}"
other.test. 60 IN MX 10 mx.other.test.
mx.other.test. 60 IN A 127.0.0.3
_smtp._tls.other.test. 60 IN TXT "v=TLSRPTv1;" "rua={rua_other}"
old.test. 60 IN MX 10 mx.old.test.
mx.old.test. 60 IN A 127.0.0.6
plain.test. 60 IN MX 10 mx.plain.test.
mx.plain.test. 60 IN A 127.0.0.4
reports.test. 60 IN MX 10 mx.reports.test.
mx.reports.test. 60 IN A 127.0.0.4
"""


def destinations(tmp_path: Path) -> str:
    path = reachable(tmp_path) / "destinations"
    path.write_text("partner.test tls=verify\nother.test tls=verify\nold.test tls=verify\n")
    return str(path)


def start(daemons, tmp_path, dns: DNSServer, port: int, ca_file: str, *flags: str):
    """A daemon with TLS reports on; no connection is kept, so each message is a session of its own."""
    return daemons("--dns-servers", dns.servers, "--smtp-port", str(port), "--destinations", destinations(tmp_path),
                   "--smtp-tls-ca", ca_file, "--tls-report", "yes", "--tls-report-ca", ca_file,
                   "--tls-report-organization", "Example Relay Inc.", "--smtp-idle-timeout", "0", *flags, *FAST,
                   maildir=False)


def report_command(daemon, dns: DNSServer, ca_file: str, *args: str) -> str:
    result = qrouter("tls-report", *args, "--queue-dir", str(daemon.spool), "--dns-servers", dns.servers,
                     "--tls-report-ca", ca_file, "--me", ME, "--tls-report-organization", "Example Relay Inc.",
                     check=True)
    return result.stdout.decode()


def shown(daemon, dns: DNSServer, ca_file: str) -> dict[tuple[str, str], list[dict]]:
    """`qrouter tls-report show --json`: (day, domain) -> policies."""
    lines = report_command(daemon, dns, ca_file, "show", "--json").splitlines()
    return {(entry["day"], entry["domain"]): entry["policies"] for entry in map(json.loads, lines)}


def counted(spool: Path) -> list[dict]:
    """What `qrouter tls-report show --json` says of a spool's counts: one entry a day and domain."""
    shown = qrouter("tls-report", "show", "--json", "--queue-dir", str(spool), check=True).stdout
    return [json.loads(line) for line in shown.decode().splitlines()]


def end_the_day(spool: Path) -> str:
    """What midnight does: the sessions counted so far are yesterday's (UTC). Every day file is
    put into yesterday's, so a test that runs over midnight still has them all in one."""
    yesterday = (datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)).isoformat()
    directory = spool / "tls-report"
    target = directory / yesterday
    for path in sorted(directory.iterdir()):
        if path.name[:2] == "20" and "." not in path.name and path != target:
            with open(target, "ab") as handle:
                handle.write(path.read_bytes())
            path.unlink()
    return yesterday


def mailed_report(message: bytes) -> tuple[email.message.EmailMessage, dict]:
    """The report message's header, and its JSON report unpacked from the gzip attachment."""
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    [attachment] = [part for part in parsed.iter_parts() if part.get_content_type() == "application/tlsrpt+gzip"]
    assert attachment.get_filename().endswith(".json.gz")
    return parsed, json.loads(gzip.decompress(base64.b64decode(attachment.get_payload())))


def test_sessions_are_counted_and_reported_by_mail_and_https_once(daemons, tmp_path, ca):
    authority, ca_file = ca
    port = free_port("127.0.0.2")
    with Receiver(authority, statuses=(503,)) as receiver, \
            DNSServer(zone(f"mailto:{REPORTS},{receiver.url}", receiver.url)) as dns, \
            AioServer(Sink(), host="127.0.0.2", port=port, tls_context=server_context(authority, "mx.partner.test")), \
            AioServer(Sink(), host="127.0.0.3", port=port, tls_context=server_context(authority, "wrong.test")), \
            AioServer(Sink(), host="127.0.0.6", port=port,
                      tls_context=server_context(authority, "mx.old.test", expired=True)), \
            AioServer(Sink(), host="127.0.0.4", port=port) as sink:
        daemon = start(daemons, tmp_path, dns, port, ca_file)
        for _ in range(2):
            assert "status=sent" in delivered(daemon, enqueue(daemon, ["u@partner.test"], BODY))
        assert "status=sent" in delivered(daemon, enqueue(daemon, ["u@plain.test"], BODY))
        for domain in ("other.test", "old.test"):
            [rcpt] = deferred(daemon, enqueue(daemon, [f"u@{domain}"], BODY))
            assert (rcpt.state, rcpt.dsn) == (PENDING, "4.7.5"), rcpt.reply

        today = datetime.datetime.now(datetime.UTC).date().isoformat()
        counted = shown(daemon, dns, ca_file)
        partner = counted[(today, "partner.test")]
        assert partner == [{"policy": {"policy-type": "no-policy-found", "policy-domain": "partner.test"},
                            "summary": {"total-successful-session-count": 2, "total-failure-session-count": 0}}]
        [other] = counted[(today, "other.test")]
        assert other["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
        [failure] = other["failure-details"]
        assert failure["result-type"] == "certificate-host-mismatch"
        assert (failure["receiving-mx-hostname"], failure["receiving-ip"], failure["sending-mta-ip"],
                failure["failed-session-count"]) == ("mx.other.test", "127.0.0.3", "127.0.0.1", 1)
        assert "the certificate names wrong.test" in failure["additional-information"]
        [old] = counted[(today, "old.test")]
        assert [f["result-type"] for f in old["failure-details"]] == ["certificate-expired"]
        [plain] = counted[(today, "plain.test")]
        assert [f["result-type"] for f in plain["failure-details"]] == ["starttls-not-supported"]
        text = report_command(daemon, dns, ca_file, "show")
        assert f"{today} partner.test: 2 successful, 0 failed (day not over)" in text
        assert "1 certificate-host-mismatch: mx.other.test[127.0.0.3] from 127.0.0.1" in text

        day = end_the_day(daemon.spool)
        said = report_command(daemon, dns, ca_file, "send")
        assert f"TLS report on other.test for {day}: report not sent now, tried again later: " \
               f"{receiver.url} answered HTTP 503" in said, said
        assert f"TLS report on partner.test for {day}: posted to {receiver.url}: HTTP 200" in said
        assert f"TLS report on plain.test for {day}: no report: _smtp._tls.plain.test asks for none" in said
        assert f"TLS report on old.test for {day}: no report" in said
        wait_for(lambda: [m for m in sink.handler.messages if REPORTS in m.rcpt_tos], what="the mailed report")

        said = report_command(daemon, dns, ca_file, "send")  # the one that failed goes now, nothing else again
        assert said.count("TLS report on") == 1 and f"other.test for {day}: posted to {receiver.url}" in said, said
        assert "nothing to send" in report_command(daemon, dns, ca_file, "send")
        assert not (daemon.spool / "tls-report" / day).exists()
        assert not (daemon.spool / "tls-report" / f"{day}.sent").exists()
        daemon.wait_idle()

    [mail] = [m for m in sink.handler.messages if REPORTS in m.rcpt_tos]
    assert mail.mail_from == "<>"
    header, mailed = mailed_report(mail.content)
    report_id = f"{day}T00:00:00Z_partner.test@{ME}"
    assert header["Subject"] == f"Report Domain: partner.test Submitter: {ME} Report-ID: <{report_id}>"
    assert (header["TLS-Report-Domain"], header["TLS-Report-Submitter"]) == ("partner.test", ME)
    assert mailed["organization-name"] == "Example Relay Inc."
    assert mailed["contact-info"] == f"postmaster@{ME}"
    assert mailed["report-id"] == report_id
    assert mailed["date-range"] == {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"}
    assert mailed["policies"] == partner

    posts = {json.loads(gzip.decompress(body))["policies"][0]["policy"]["policy-domain"]: (path, headers, body)
             for path, headers, body in receiver.posts}
    assert len(receiver.posts) == 3 and sorted(posts) == ["other.test", "partner.test"]  # other.test: 503, then 200
    path, headers, body = posts["other.test"]
    assert path == "/tlsrpt" and headers["Content-Type"] == "application/tlsrpt+gzip"
    assert json.loads(gzip.decompress(body))["policies"] == [other]
    assert json.loads(gzip.decompress(posts["partner.test"][2]))["report-id"] == report_id


def test_a_daemon_killed_between_days_loses_no_counts_and_reports_at_its_start(daemons, tmp_path, ca):
    authority, ca_file = ca
    port = free_port("127.0.0.2")
    with DNSServer(zone(f"mailto:{REPORTS}", f"mailto:{REPORTS}")) as dns, \
            AioServer(Sink(), host="127.0.0.2", port=port, tls_context=server_context(authority, "mx.partner.test")), \
            AioServer(Sink(), host="127.0.0.3", port=port, tls_context=server_context(authority, "wrong.test")), \
            AioServer(Sink(), host="127.0.0.4", port=port) as sink:
        daemon = start(daemons, tmp_path, dns, port, ca_file)
        assert "status=sent" in delivered(daemon, enqueue(daemon, ["u@partner.test"], BODY))
        deferred(daemon, enqueue(daemon, ["u@other.test"], BODY))
        daemon.kill()  # kill -9: the workers go with it
        today = datetime.datetime.now(datetime.UTC).date().isoformat()
        with open(daemon.spool / "tls-report" / today, "ab") as handle:
            handle.write(b'\x1e{"domain": "partner.test", "type": "no-pol')  # a line a crash cut short
        day = end_the_day(daemon.spool)

        daemon = start(daemons, tmp_path, dns, port, ca_file)  # it finds the day over and reports it
        wait_for(lambda: len([m for m in sink.handler.messages if REPORTS in m.rcpt_tos]) == 2, what="two reports")
        wait_for(lambda: not (daemon.spool / "tls-report" / day).exists(), what="the day's file removed")
        wait_for(lambda: f"TLS report on partner.test for {day}: queued for <{REPORTS}>" in daemon.log(),
                 what="the report logged")
        assert "nothing to send" in report_command(daemon, dns, ca_file, "send")

    reports = {report["policies"][0]["policy"]["policy-domain"]: report["policies"][0]
               for report in (mailed_report(m.content)[1] for m in sink.handler.messages if REPORTS in m.rcpt_tos)}
    assert reports["partner.test"]["summary"] == {"total-successful-session-count": 1,
                                                  "total-failure-session-count": 0}
    assert reports["other.test"]["summary"] == {"total-successful-session-count": 0,
                                                "total-failure-session-count": 1}
    assert reports["other.test"]["failure-details"][0]["result-type"] == "certificate-host-mismatch"


def test_without_tls_report_nothing_is_counted(daemons, tmp_path, ca):
    authority, ca_file = ca
    port = free_port("127.0.0.2")
    with DNSServer(zone(f"mailto:{REPORTS}", f"mailto:{REPORTS}")) as dns, \
            AioServer(Sink(), host="127.0.0.2", port=port, tls_context=server_context(authority, "mx.partner.test")):
        daemon = daemons("--dns-servers", dns.servers, "--smtp-port", str(port), "--smtp-tls-ca", ca_file, *FAST,
                         maildir=False)
        assert "status=sent" in delivered(daemon, enqueue(daemon, ["u@partner.test"], BODY))
    assert not (daemon.spool / "tls-report").exists()


def test_send_refuses_a_day_that_is_not_over(tmp_path):
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    result = qrouter("tls-report", "send", "--day", today, "--queue-dir", str(tmp_path / "spool"))
    assert result.returncode == 64
    assert f"--day {today}: the day is not over yet (UTC)" in result.stderr.decode()
    result = qrouter("tls-report", "send", "--day", "yesterday", "--queue-dir", str(tmp_path / "spool"))
    assert result.returncode == 64 and "'yesterday' is not a day (YYYY-MM-DD)" in result.stderr.decode()


@pytest.mark.parametrize(("records", "uris"), [
    (["v=TLSRPTv1; rua=mailto:a@example.net,https://r.example.net/v1"], ["mailto:a@example.net",
                                                                         "https://r.example.net/v1"]),
    (["v=TLSRPTv1;rua=mailto:a@example.net, http://r.example.net/v1, ftp://x"], ["mailto:a@example.net"]),
    (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@example.net"], ["mailto:a@example.net"]),
    (["v=TLSRPTv1; rua=mailto:a@example.net", "v=TLSRPTv1; rua=mailto:b@example.net"], []),  # two: none
    (["v=TLSRPTv10; rua=mailto:a@example.net"], []),
    ([], []),
])
def test_the_tlsrpt_record_gives_the_mailto_and_https_addresses(records, uris):
    assert parse_record(records) == uris


def test_a_tlsrpt_record_without_rua_is_an_error():
    with pytest.raises(ValueError, match="has no rua="):
        parse_record(["v=TLSRPTv1; ruf=mailto:a@example.net"])


def test_a_receiver_whose_certificate_is_not_trusted_gets_nothing_and_it_is_tried_again(tmp_path, ca):
    _, ca_file = ca
    spool = reachable(tmp_path) / "spool"
    Spool(spool).create()
    recorder = Recorder(str(spool), enabled=True)  # as the SMTP transport records a session
    recorder.record("partner.test", "no-policy-found", (), "mx.partner.test", "", "192.0.2.1", "192.0.2.25")
    subprocess.run(["chown", "-R", DAEMON_USER, str(spool)], check=True)
    day = end_the_day(spool)
    with Receiver(trustme.CA()) as receiver, DNSServer(zone(receiver.url, receiver.url)) as dns:
        for _ in range(2):
            result = qrouter("tls-report", "send", "--queue-dir", str(spool), "--dns-servers", dns.servers,
                             "--tls-report-ca", ca_file, "--me", ME, check=True)
            said = result.stdout.decode()
            assert f"TLS report on partner.test for {day}: report not sent now, tried again later: " \
                   f"cannot post to {receiver.url}:" in said and "CERTIFICATE_VERIFY_FAILED" in said, said
    assert receiver.posts == []
    assert (spool / "tls-report" / day).exists()
