"""Sending SMTP TLS reports (RFC 8460) once a UTC day is over, and showing what they will say.

With `tls-report`, the SMTP transport counts every TLS session to an MX host in the day's file
(workers/tls_outcomes.py). Once the day is over, each policy domain with sessions is asked where
it wants its report (`_smtp._tls.DOMAIN` TXT, `v=TLSRPTv1; rua=...`), and the report (JSON,
gzipped) goes to every address it gives:

    mailto:  a message queued into our own spool like any other (multipart/report;
             report-type="tlsrpt", the report as application/tlsrpt+gzip), from <>, with the
             TLS-Report-Domain and TLS-Report-Submitter fields of RFC 8460 5.3, DKIM-signed
             with tls-report-dkim-key when it is set (workers/report_signing.py); a report
             that cannot be signed is not sent unsigned, it is tried again later
    https:   POSTed with Content-Type application/tlsrpt+gzip, the server's certificate verified
             (tls-report-ca, else the system store), within HTTP_TIMEOUT

Each report sent (or refused for good, or a domain without a record) is noted, fsynced, in the
day's journal (QUEUE-DIR/tls-report/YYYY-MM-DD.sent) before the next one goes: a send asked for
again, or after a restart, skips what is noted, so a report goes once; a crash between queuing a
mailto report and noting it makes it go twice at worst (the same report-id, which the receiver
can tell), never not at all. A report that could not go now (DNS or the receiver failing) is
tried again at the next send, for GIVE_UP_DAYS days. When every domain of a day is done, the
day's file and then its journal are removed.

The daemon's supervisor asks a network worker to send (Trigger, one call from its loop): the
DNS and HTTP waits are in one of that worker's lookup threads, never in the supervisor's loop,
and never as root. `qrouter tls-report send` does the same work in its own process, as the
spool's user. A lock file keeps two senders from working at once.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import fcntl
import gzip
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from policy.tls_report import (
    Counts,
    Policy,
    file_name,
    is_https,
    json_text,
    json_texts,
    mailto_address,
    parse_day,
    parse_record,
    read_outcomes,
    report,
    report_id,
    tally,
    utc_day,
)
from router.config import Config
from router.config.dkim_key import DkimKeyError
from router.logs.lines import logger
from router.spool import INCOMING, Spool
from router.spool.address import AddressError, parse_path, split_address
from router.spool.durable import fsync_dir, unlink_quietly, write_all
from router.spool.queue_file import QueueFile, Recipient
from router.spool.queue_id import arrival_of, new_queue_id
from workers.report_signing import sign
from workers.tls_outcomes import DIRECTORY, day_path

log = logger("tlsrpt")

JOURNAL = ".sent"
LOCK = "lock"
GIVE_UP_DAYS = 3  # a report that could not go is tried this many days after its day, then dropped
CHECK_SECONDS = 600.0  # how often the supervisor looks for a day to report (one directory listing)
ASK_AGAIN_SECONDS = 3600.0  # after asking a worker to send, how long before asking again
NO_WORKER_SECONDS = 5.0  # no network worker to ask yet (starting): ask again this soon
ASK = "tls-report"  # the key of the record that asks a network worker to send (workers/worker.py)
HTTP_TIMEOUT = (10.0, 30.0)  # seconds to connect to a receiver, and for each read of its answer
MAX_ANSWER = 4096  # bytes of an HTTP receiver's answer read for the log


class Trigger:
    """The supervisor's part: when a day is over and not yet reported, ask a network worker to
    send (`ask` writes the record to one and gives its pid, 0 when none could be asked)."""

    def __init__(self) -> None:
        self.next_check = 0.0

    def tick(self, config: Config, ask: Callable[[dict[str, Any]], int]) -> None:
        now = time.monotonic()
        if not config.tls_report or now < self.next_check:
            return
        self.next_check = now + CHECK_SECONDS
        if days_over(config.queue_dir, utc_day(time.time())):
            self.next_check = now + (ASK_AGAIN_SECONDS if ask({ASK: "send"}) else NO_WORKER_SECONDS)


def days_over(queue_dir: str, today: datetime.date) -> list[datetime.date]:
    """The days before `today` with outcomes (a file) in the spool, oldest first."""
    return [day for day in days_kept(queue_dir) if day < today]


def days_kept(queue_dir: str) -> list[datetime.date]:
    """The days with outcomes (a file) in the spool, or a journal a crash left, oldest first."""
    try:
        names = os.listdir(os.path.join(queue_dir, DIRECTORY))
    except FileNotFoundError:
        return []
    return sorted({day for day in map(_day_of, names) if day is not None})


def _day_of(name: str) -> datetime.date | None:
    try:
        return parse_day(name.removesuffix(JOURNAL))
    except ValueError:
        return None


def counts_of(queue_dir: str, day: datetime.date) -> dict[str, dict[Policy, Counts]]:
    """What the day's outcomes add up to, by policy domain; nothing when it has no file."""
    try:
        with open(day_path(queue_dir, day.isoformat()), "rb") as handle:
            return tally(read_outcomes(handle.read()))
    except FileNotFoundError:
        return {}


class Journal:
    """What has been done about a day's reports: (domain, uri) -> what came of it; uri "" for a
    domain that asks for none."""

    def __init__(self, path: str, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        self.done: dict[tuple[str, str], str] = {}
        try:
            with open(path, "rb") as handle:
                for entry in json_texts(handle.read()):  # a note a crash cut short: that report was not noted
                    self.done[(str(entry.get("domain")), str(entry.get("uri")))] = str(entry.get("result"))
        except FileNotFoundError:
            pass

    def note(self, domain: str, uri: str, result: str) -> None:
        """Noted for good (fsynced) before anything else is sent."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        try:
            write_all(fd, json_text({"domain": domain, "uri": uri, "result": result}))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done[(domain, uri)] = result

    def result(self, domain: str, uri: str) -> str:
        return self.done.get((domain, uri), "")


class Sender:
    """Sends the reports of days that are over; one at a time per spool (the lock file)."""

    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self.directory = os.path.join(config.queue_dir, DIRECTORY)
        self.me = config.hostname
        self._resolver: Any = None
        self._http: Any = None

    def send(self, days: list[datetime.date] | None = None, *, wait: bool = True) -> list[str]:
        """Send the reports of `days` (by default every day over with outcomes); what was done,
        a line each (also logged). Without `wait`, nothing when another sender is at work."""
        today = utc_day(time.time())
        try:
            lock = os.open(os.path.join(self.directory, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            return []  # no outcome was ever recorded
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return []
            said: list[str] = []
            for day in days_over(self.config.queue_dir, today) if days is None else days:
                said += self._send_day(day, today)
            return said
        finally:
            os.close(lock)

    def _send_day(self, day: datetime.date, today: datetime.date) -> list[str]:
        journal = Journal(day_path(self.config.queue_dir, day.isoformat() + JOURNAL),
                          0o660 if self.config.spool_group else 0o600)
        domains = counts_of(self.config.queue_dir, day)
        if not domains:  # no file (a crash after it was removed left the journal), or nothing whole in it
            unlink_quietly(day_path(self.config.queue_dir, day.isoformat()))
            unlink_quietly(journal.path)
            return []
        give_up = (today - day).days > GIVE_UP_DAYS
        said: list[str] = []
        done = True
        for domain, policies in sorted(domains.items()):
            finished, lines = self._send_domain(day, domain, policies, journal, give_up)
            done &= finished
            said += lines
        if done:
            os.unlink(day_path(self.config.queue_dir, day.isoformat()))
            fsync_dir(self.directory)
            unlink_quietly(journal.path)
        return said

    def _send_domain(self, day: datetime.date, domain: str, policies: dict[Policy, Counts], journal: Journal,
                     give_up: bool) -> tuple[bool, list[str]]:
        """Send `domain`'s report wherever it asks; whether it is done with (sent, refused,
        nowhere to send, or given up) and what was said."""
        if journal.result(domain, ""):
            return True, []
        uris, trouble = self._addresses(domain)
        if trouble:
            return self._later(day, domain, "", trouble, journal, give_up)
        if not uris:
            journal.note(domain, "", "no TLS reporting record")
            return True, [self._say(day, domain, f"no report: _smtp._tls.{domain} asks for none")]
        made = report(policies, day, organization=self.config.tls_report_organization or self.me,
                      contact=self._contact(), report_id=report_id(day, domain, self.me))
        data = gzip.compress(json.dumps(made).encode(), mtime=0)
        said: list[str] = []
        done = True
        for uri in uris:
            if journal.result(domain, uri):
                continue
            final, text = self._post(uri, data) if is_https(uri) else self._mail(uri, domain, day, data, made)
            if final:
                journal.note(domain, uri, text)
                said.append(self._say(day, domain, text))
            else:
                finished, lines = self._later(day, domain, uri, text, journal, give_up)
                done &= finished
                said += lines
        return done, said

    def _later(self, day: datetime.date, domain: str, uri: str, trouble: str, journal: Journal,
               give_up: bool) -> tuple[bool, list[str]]:
        if give_up:
            journal.note(domain, uri, f"given up: {trouble}")
            return True, [self._say(day, domain, f"report given up after {GIVE_UP_DAYS} days: {trouble}")]
        return False, [self._say(day, domain, f"report not sent now, tried again later: {trouble}")]

    def _say(self, day: datetime.date, domain: str, text: str) -> str:
        line = f"TLS report on {domain} for {day.isoformat()}: {text}"
        log.info("%s", line)
        return line

    def _contact(self) -> str:
        return self.config.tls_report_contact or f"postmaster@{self.me}"

    def _sender(self) -> str:
        """The From: of mailed reports, whose domain signs them unless tls-report-dkim-domain
        says otherwise."""
        contact = self._contact()
        return contact if _is_address(contact) else f"postmaster@{self.me}"

    def _addresses(self, domain: str) -> tuple[list[str], str]:
        """The domain's reporting URIs, and "" or why DNS could not say now."""
        from workers import mx_lookup  # the DNS library only where reports are sent
        from workers.mx_hosts import MXLookupError

        if self._resolver is None:
            self._resolver = mx_lookup.make_resolver(self.config.dns_servers, self.config.dns_timeout)
        name = f"_smtp._tls.{domain}"
        try:
            texts = mx_lookup.lookup_txt(name, self._resolver)
        except MXLookupError as exc:
            return [], str(exc)
        try:
            return parse_record(texts), ""
        except ValueError as exc:
            log.warning("%s TXT: %s; no report", name, exc)
            return [], ""

    def _mail(self, uri: str, domain: str, day: datetime.date, data: bytes, made: dict) -> tuple[bool, str]:
        """Queue the report to the address of a mailto: URI; (final, what happened)."""
        try:
            to = parse_path(mailto_address(uri))
        except AddressError as exc:
            return True, f"refused: {uri} is not an address ({exc})"
        text = self._message(to, domain, day, data, made)
        if self.config.tls_report_dkim_key:
            try:
                text = sign(text, self.config.tls_report_dkim_key, self.config.tls_report_dkim_selector,
                            self.config.tls_report_dkim_domain or split_address(self._sender())[1])
            except DkimKeyError as exc:
                return False, f"cannot sign the report to <{to}>: {exc}"
        queue_id = new_queue_id()
        message = QueueFile(queue_id, arrival_of(queue_id), "", [Recipient(to, notify="NEVER")], text)
        message.add_log(message.arrival, f"TLS report on {domain} for {day.isoformat()}")
        try:
            self.spool.write(message, INCOMING)
        except OSError as exc:
            return False, f"cannot queue the report to <{to}>: {exc.strerror or exc}"
        return True, f"queued for <{to}> as {queue_id}"

    def _message(self, to: str, domain: str, day: datetime.date, data: bytes, made: dict) -> bytes:
        """The report as a message (RFC 8460 5.3): multipart/report; report-type="tlsrpt"."""
        boundary = f"{uuid.uuid4().hex}/{self.me}"
        fields = [f"From: <{self._sender()}>", f"To: <{to}>",
                  f"Subject: Report Domain: {domain} Submitter: {self.me} Report-ID: <{made['report-id']}>",
                  f"Date: {email.utils.formatdate(time.time(), localtime=True)}",
                  f"Message-ID: <{uuid.uuid4().hex}@{self.me}>",
                  f"TLS-Report-Domain: {domain}", f"TLS-Report-Submitter: {self.me}",
                  "Auto-Submitted: auto-generated", "MIME-Version: 1.0",
                  f'Content-Type: multipart/report; report-type="tlsrpt";\n\tboundary="{boundary}"']
        text = (f"This is an aggregate TLS report from {self.me} about the SMTP TLS sessions to {domain} "
                f"on {day.isoformat()} (UTC): {_sessions(made['policies'])}.\n")
        encoded = base64.encodebytes(data)
        body = (f"This is a MIME-encapsulated message.\n\n--{boundary}\n"
                f"Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n\n{text}\n"
                f"--{boundary}\nContent-Type: application/tlsrpt+gzip\nContent-Transfer-Encoding: base64\n"
                f'Content-Disposition: attachment;\n\tfilename="{file_name(self.me, domain, day)}"\n\n').encode()
        return "\n".join(fields).encode() + b"\n\n" + body + encoded + f"\n--{boundary}--\n".encode()

    def _post(self, uri: str, data: bytes) -> tuple[bool, str]:
        """POST the report to an https: URI; (final, what happened). A 2XX answer is taken; a 4XX
        (but 408 and 429) refuses it for good; anything else is tried again later."""
        import urllib3  # only where reports are posted

        if self._http is None:
            self._http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=self.config.tls_report_ca or None,
                                             timeout=urllib3.Timeout(connect=HTTP_TIMEOUT[0], read=HTTP_TIMEOUT[1]),
                                             retries=False)
        try:
            answer = self._http.request("POST", uri, body=data, headers={"Content-Type": "application/tlsrpt+gzip"},
                                        preload_content=False, redirect=False)
        except urllib3.exceptions.HTTPError as exc:
            return False, f"cannot post to {uri}: {_reason(exc)}"
        try:
            said = answer.read(MAX_ANSWER, decode_content=False).decode("utf-8", "replace").strip()[:200]
        except urllib3.exceptions.HTTPError:
            said = ""
        finally:
            answer.release_conn()
        status = f"HTTP {answer.status}" + (f" ({said})" if said else "")
        if 200 <= answer.status < 300:
            return True, f"posted to {uri}: {status}"
        if 400 <= answer.status < 500 and answer.status not in (408, 429):
            return True, f"refused by {uri}: {status}"
        return False, f"{uri} answered {status}"


def _is_address(text: str) -> bool:
    try:
        return bool(parse_path(text))
    except AddressError:
        return False


def _reason(exc: BaseException) -> str:
    """What urllib3 wraps (a refused connection, a certificate not verified, a timeout), in short."""
    inner = getattr(exc, "reason", None)
    return str(inner or exc)


def show(config: Config, days: list[datetime.date], as_json: bool = False) -> list[str]:
    """What `qrouter tls-report show` prints: for each day and policy domain the sessions by
    policy, the failures by what failed and where, and what became of the report. With
    `as_json`, one JSON object a day and domain, its `policies` as the report will have them."""
    lines: list[str] = []
    today = utc_day(time.time())
    for day in days:
        journal = Journal(day_path(config.queue_dir, day.isoformat() + JOURNAL))
        for domain, policies in sorted(counts_of(config.queue_dir, day).items()):
            made = report(policies, day, organization="", contact="", report_id="")
            if as_json:
                lines.append(json.dumps({"day": day.isoformat(), "domain": domain, "policies": made["policies"]}))
                continue
            results = [result for (name, _), result in journal.done.items() if name == domain]
            state = "; ".join(results) or ("day not over" if day >= today else "not sent yet")
            lines.append(f"{day.isoformat()} {domain}: {_sessions(made['policies'])} ({state})")
            for entry in made["policies"]:
                policy = entry["policy"]
                strings = f" {' '.join(policy['policy-string'])}" if "policy-string" in policy else ""
                lines.append(f"  {policy['policy-type']}{strings}: {_sessions([entry])}")
                for failure in entry.get("failure-details", ()):
                    where = f"{failure.get('receiving-mx-hostname', '')}[{failure.get('receiving-ip', '')}]"
                    lines.append(f"    {failure['failed-session-count']} {failure['result-type']}: {where} from "
                                 f"{failure.get('sending-mta-ip', '?')}: {failure.get('additional-information', '')}")
    return lines


def _sessions(entries: list[dict]) -> str:
    successes = sum(entry["summary"]["total-successful-session-count"] for entry in entries)
    failures = sum(entry["summary"]["total-failure-session-count"] for entry in entries)
    return f"{successes} successful, {failures} failed"
