"""SMTP TLS reporting (RFC 8460): the names it gives to TLS session outcomes, the line an outcome
is kept as, what a day's outcomes add up to, the JSON report made of them, and the
`_smtp._tls` TXT record that says where a domain wants its reports.

Pure grammar and arithmetic: workers/tls_outcomes.py writes the lines as sessions end,
workers/tls_reports.py reads them back once the day is over and sends the reports.

An outcome (and the note of a report sent) is kept as one JSON text of an RFC 7464 sequence:
the record separator (0x1E), the JSON object, a line feed. A line cut short by a crash cannot be
read as JSON and is passed over, and the separator in front of the next one keeps that one
readable, even when it was appended right behind the broken one.
"""

from __future__ import annotations

import datetime
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

# Policy types (RFC 8460 4.3). This module only knows the names; DANE (tlsa) and MTA-STS (sts)
# come from the code that applies those policies.
TLSA, STS, NO_POLICY_FOUND = "tlsa", "sts", "no-policy-found"
POLICY_TYPES = (TLSA, STS, NO_POLICY_FOUND)

# Result types (RFC 8460 4.3.1-4.3.3); "" is a successful session.
SUCCESS = ""
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID, DNSSEC_INVALID, DANE_REQUIRED = "tlsa-invalid", "dnssec-invalid", "dane-required"
STS_POLICY_FETCH_ERROR, STS_POLICY_INVALID, STS_WEBPKI_INVALID = (
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")
RESULT_TYPES = (STARTTLS_NOT_SUPPORTED, CERTIFICATE_HOST_MISMATCH, CERTIFICATE_EXPIRED, CERTIFICATE_NOT_TRUSTED,
                VALIDATION_FAILURE, TLSA_INVALID, DNSSEC_INVALID, DANE_REQUIRED, STS_POLICY_FETCH_ERROR,
                STS_POLICY_INVALID, STS_WEBPKI_INVALID)

SEPARATOR = b"\x1e"  # RFC 7464's record separator: json.dumps never writes it unescaped
VERSION = "v=TLSRPTv1"
MAX_DETAIL = 200  # characters of additional-information kept from one failure
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class Outcome:
    """One TLS session (or attempt at one) to a server of `domain`, under a policy.

    `strings` are the policy's own text (an MTA-STS policy's lines, the TLSA records) and
    `mx_hosts` the MX patterns it names; both empty under no-policy-found. `result` is SUCCESS or
    one of RESULT_TYPES; the addresses and `mx_host` name the session; `detail` says in words why
    it failed (additional-information)."""

    domain: str
    policy_type: str
    result: str
    mx_host: str
    sending_ip: str
    receiving_ip: str
    detail: str = ""
    strings: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        """The outcome as one text of the sequence: separator, JSON, line feed."""
        record = {"domain": self.domain, "type": self.policy_type, "result": self.result, "mx": self.mx_host,
                  "from": self.sending_ip, "to": self.receiving_ip}
        if self.detail:
            record["detail"] = self.detail[:MAX_DETAIL]
        if self.strings:
            record["strings"] = list(self.strings)
        if self.mx_hosts:
            record["mx-hosts"] = list(self.mx_hosts)
        return json_text(record)


def json_text(record: dict) -> bytes:
    """One JSON text of an RFC 7464 sequence: separator, JSON, line feed."""
    return SEPARATOR + json.dumps(record, ensure_ascii=True).encode() + b"\n"


def json_texts(data: bytes) -> Iterator[dict]:
    """The JSON objects of a sequence; texts a crash cut short, or that are not JSON objects, are
    passed over."""
    for text in data.split(SEPARATOR):
        if not text.endswith(b"\n"):
            continue  # empty (before the first separator), or cut short
        try:
            record = json.loads(text)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def read_outcomes(data: bytes) -> Iterator[Outcome]:
    """The outcomes of a day file; texts that are not whole outcomes are passed over."""
    for record in json_texts(data):
        try:
            yield Outcome(str(record["domain"]), str(record["type"]), str(record["result"]), str(record["mx"]),
                          str(record["from"]), str(record["to"]), str(record.get("detail", "")),
                          tuple(str(s) for s in record.get("strings", ())),
                          tuple(str(h) for h in record.get("mx-hosts", ())))
        except (KeyError, TypeError):
            continue


@dataclass(frozen=True)
class Policy:
    """What a report's `policies` entry is about: RFC 8460 4.4's policy object."""

    domain: str
    policy_type: str
    strings: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failure:
    """The fields a failure-details entry is counted by."""

    result: str
    sending_ip: str
    mx_host: str
    receiving_ip: str
    detail: str


@dataclass
class Counts:
    successes: int = 0
    failures: Counter[Failure] = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


def tally(outcomes: Iterable[Outcome]) -> dict[str, dict[Policy, Counts]]:
    """The outcomes added up by policy domain (lower case), then by policy."""
    domains: dict[str, dict[Policy, Counts]] = {}
    for outcome in outcomes:
        domain = outcome.domain.lower().rstrip(".")
        policy = Policy(domain, outcome.policy_type, outcome.strings, outcome.mx_hosts)
        counts = domains.setdefault(domain, {}).setdefault(policy, Counts())
        if outcome.result == SUCCESS:
            counts.successes += 1
        else:
            counts.failures[Failure(outcome.result, outcome.sending_ip, outcome.mx_host, outcome.receiving_ip,
                                    outcome.detail)] += 1
    return domains


def report(policies: dict[Policy, Counts], day: datetime.date, *, organization: str, contact: str,
           report_id: str) -> dict:
    """The JSON report (RFC 8460 4.4) of one policy domain for one UTC day."""
    entries = []
    for policy, counts in sorted(policies.items(), key=lambda item: (item[0].policy_type, item[0].strings)):
        described: dict = {"policy-type": policy.policy_type, "policy-domain": policy.domain}
        if policy.strings:
            described["policy-string"] = list(policy.strings)
        if policy.mx_hosts:
            described["mx-host"] = list(policy.mx_hosts)
        entry: dict = {"policy": described, "summary": {"total-successful-session-count": counts.successes,
                                                        "total-failure-session-count": counts.failed}}
        if counts.failures:
            entry["failure-details"] = [_failure_details(failure, count) for failure, count in
                                        sorted(counts.failures.items(), key=lambda item: -item[1])]
        entries.append(entry)
    made: dict = {"organization-name": organization,
                  "date-range": {"start-datetime": f"{day.isoformat()}T00:00:00Z",
                                 "end-datetime": f"{day.isoformat()}T23:59:59Z"}}
    if contact:
        made["contact-info"] = contact
    made["report-id"] = report_id
    made["policies"] = entries
    return made


def _failure_details(failure: Failure, count: int) -> dict:
    details = {"result-type": failure.result}
    if failure.sending_ip:
        details["sending-mta-ip"] = failure.sending_ip
    if failure.mx_host:
        details["receiving-mx-hostname"] = failure.mx_host
    if failure.receiving_ip:
        details["receiving-ip"] = failure.receiving_ip
    details["failed-session-count"] = count  # type: ignore[assignment]
    if failure.detail:
        details["additional-information"] = failure.detail
    return details


def report_id(day: datetime.date, domain: str, submitter: str) -> str:
    """The same for the same day and domain: a report sent again after a crash is known as the
    same one by the receiver."""
    return f"{day.isoformat()}T00:00:00Z_{domain}@{submitter}"


def file_name(submitter: str, domain: str, day: datetime.date) -> str:
    """The attachment's name (RFC 8460 5.1): sender!policy-domain!begin!end.json.gz."""
    begin = int(datetime.datetime.combine(day, datetime.time(), datetime.UTC).timestamp())
    return f"{submitter}!{domain}!{begin}!{begin + 86399}.json.gz"


def parse_record(texts: Iterable[str]) -> list[str]:
    """The reporting URIs (rua) of `_smtp._tls` TXT records (RFC 8460 3), each record's strings
    joined: none unless exactly one record starts with v=TLSRPTv1; only mailto: and https: URIs
    are kept, in the order given. ValueError says what is wrong with the one record."""
    records = [text for text in texts if text.startswith(VERSION) and text[len(VERSION):][:1] in (";", "")]
    if len(records) != 1:
        return []
    fields: dict[str, str] = {}
    for part in records[0].split(";")[1:]:
        name, equals, value = part.strip().partition("=")
        if name and equals:
            fields.setdefault(name.strip().lower(), value.strip())
    rua = fields.get("rua", "")
    if not rua:
        raise ValueError(f"{records[0]!r} has no rua=")
    return [uri for uri in (item.strip() for item in rua.split(",")) if _scheme(uri) in ("mailto", "https")]


def _scheme(uri: str) -> str:
    return uri.partition(":")[0].lower() if ":" in uri else ""


def mailto_address(uri: str) -> str:
    """The address of a mailto: URI (RFC 6068), without its query (?subject=...)."""
    return unquote(urlsplit(uri).path)


def is_https(uri: str) -> bool:
    return _scheme(uri) == "https"


def parse_day(text: str) -> datetime.date:
    """A UTC day written YYYY-MM-DD (a day file's name, the --day of the command)."""
    if not _DAY.fullmatch(text):
        raise ValueError(f"{text!r} is not a day (YYYY-MM-DD)")
    return datetime.date.fromisoformat(text)


def utc_day(timestamp: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).date()
