"""Recording TLS session outcomes for SMTP TLS reports (RFC 8460), as the sessions end.

The SMTP transport calls `Recorder.record` once per outcome: a TLS session that was set up under
its policy, or one that failed to be (no STARTTLS, a certificate that does not pass, a handshake
that breaks). Code that applies a published policy (DANE: policy type `tlsa`, MTA-STS: `sts`)
calls it with that policy's type, text and MX patterns; `opened` and `failed` are the calls for
sessions under no published policy (`no-policy-found`), which the transport makes today.

Outcomes go to QUEUE-DIR/tls-report/YYYY-MM-DD, the UTC day of the session, one line each
(policy/tls_report.py says how it reads): opened with O_APPEND and written with one write(2) per
line, so lines from every worker and thread land whole and never interleave, and a line a crash
cut short costs that one outcome only. Nothing is fsynced: a killed process loses nothing the
kernel took, and a power cut costs a few counts of a statistic, not mail. The file is opened for
each line, so that once a day is over and its file reported and removed, no one writes into it.

Sessions to relay hosts and LMTP servers are not recorded: a report goes to the domain mail is
addressed to, whose policy covers its MX hosts only. Nor are sessions under the level `none`,
which never try TLS.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from policy.tls_policy import TLS_NONE
from policy.tls_report import (
    NO_POLICY_FOUND,
    STARTTLS_NOT_SUPPORTED,
    STS,
    SUCCESS,
    TLSA,
    Outcome,
    Policy,
    utc_day,
)
from router.spool.durable import make_shared_dir

if TYPE_CHECKING:
    from workers.smtp import Server
    from workers.smtp_client import SMTPClient, TLSFailure, TLSFallback

log = logging.getLogger("qrouter")

DIRECTORY = "tls-report"


def day_path(queue_dir: str, day: str) -> str:
    return os.path.join(queue_dir, DIRECTORY, day)


class Recorder:
    """Writes outcomes into the spool when `tls-report` is on; does nothing otherwise."""

    def __init__(self, queue_dir: str, enabled: bool, group: str = "") -> None:
        self.queue_dir = queue_dir
        self.enabled = enabled
        self.group = group
        self.trouble_logged = False

    def record(self, policy_domain: str, policy_type: str, policy_strings: tuple[str, ...], mx_host: str,
               result_type: str, sending_ip: str, receiving_ip: str, failure_detail: str = "",
               policy_mx_hosts: tuple[str, ...] = ()) -> None:
        """Count one session to `mx_host` (receiving_ip) of `policy_domain`, from `sending_ip`:
        `result_type` "" when TLS was set up as the policy asks, else RFC 8460's name of what
        failed (policy/tls_report.py RESULT_TYPES), with `failure_detail` in words. Never raises:
        a report is not worth a delivery."""
        if not self.enabled or not policy_domain:
            return
        outcome = Outcome(policy_domain.lower().rstrip("."), policy_type, result_type, mx_host, sending_ip,
                          receiving_ip, failure_detail, tuple(policy_strings), tuple(policy_mx_hosts))
        self._append(outcome.to_bytes())

    def opened(self, server: Server, client: SMTPClient) -> None:
        """A new session to an MX host: TLS set up (whatever the certificate under `may`), or
        none because the server did not offer STARTTLS. A plain session after a failed handshake
        was counted as that failure already (`failed`)."""
        if server.tls.level == TLS_NONE or not server.report_domain:
            return
        if client.tls:
            result = SUCCESS
        elif "STARTTLS" not in client.extensions:
            result = STARTTLS_NOT_SUPPORTED
        else:
            return  # the fallback after a failed handshake, or a STARTTLS refused under `may`
        detail = "" if client.tls else f"{client.peer} did not offer STARTTLS"
        self._record_under(_policy(server), server, result, client.local_ip, detail)

    def failed(self, server: Server, error: TLSFailure | TLSFallback) -> None:
        """A session to an MX host that could not be set up as its level asks."""
        if error.result_type and server.report_domain:
            self._record_under(_policy(server), server, error.result_type, error.local_ip, error.reply.text)

    def _record_under(self, policy: Policy, server: Server, result_type: str, sending_ip: str, detail: str) -> None:
        self.record(policy.domain, policy.policy_type, policy.strings, server.name, result_type, sending_ip, server.ip,
                    detail, policy.mx_hosts)

    def _append(self, line: bytes) -> None:
        path = day_path(self.queue_dir, utc_day(time.time()).isoformat())
        flags, mode = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o660 if self.group else 0o600
        try:
            try:
                fd = os.open(path, flags, mode)
            except FileNotFoundError:  # the first outcome recorded in this spool
                make_shared_dir(os.path.dirname(path), self.group)
                fd = os.open(path, flags, mode)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            if not self.trouble_logged:  # said once per worker: a full disk must not flood the log
                self.trouble_logged = True
                log.warning("cannot record a TLS session outcome in %s: %s; TLS reports will miss it",
                            path, exc.strerror or exc)


def _policy(server: Server) -> Policy:
    """The policy a session to `server` is counted under: its DANE records (policy/dane.py; the
    unusable ones when it has only those, whose sessions are TLS without authentication, a
    success once set up) or why DANE refused it, the MTA-STS policy it was used under
    (policy/mta_sts.py Applied) with its `mx` patterns (RFC 8460 4.4's mx-host), else none found."""
    if server.tls.published or server.tls.refusal_type:
        return Policy(server.report_domain, TLSA, tuple(str(record) for record in server.tls.published))
    if server.sts is not None:
        return Policy(server.sts.domain, STS, server.sts.policy.lines(), server.sts.policy.mx)
    return Policy(server.report_domain, NO_POLICY_FOUND)
