"""DKIM signatures on the TLS reports qrouter mails (RFC 8460 5.3), through the real daemon: a key
pair made here, its public key served as `SELECTOR._domainkey.DOMAIN` TXT by the loopback DNS
server, the report queued by a network worker and delivered to an aiosmtpd sink, and what the
sink received verified by dkimpy asking that DNS server; and the keys' checks, each naming the
file and line (or flag) of what is wrong.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import dkim
import dns.message
import dns.query
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from router.config import ConfigError, load
from router.spool import Spool
from tests.daemon import DAEMON_USER, qrouter, reachable, wait_for
from tests.dns_server import DNSServer
from tests.smtp_servers import AioServer, free_port
from tests.test_smtp_tls_auth import FAST, Sink
from tests.test_tls_report import REPORTS, end_the_day, mailed_report
from workers.tls_outcomes import Recorder

SELECTOR = "tlsrpt2026"
SIGNER = "relay.test"  # the domain that signs: of the From: address, or tls-report-dkim-domain


def key_pair(kind: str) -> tuple[bytes, str]:
    """A private key as PEM (PKCS#8, as openssl genpkey writes it) and the DKIM key record of its
    public key (RFC 6376 3.6.1, RFC 8463), with the service type RFC 8460 5.3 asks for."""
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes_raw()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, f"v=DKIM1; k={kind}; s=tlsrpt; p={base64.b64encode(public).decode()}"


def key_file(directory: Path, pem: bytes, owner: str = f"root:{DAEMON_USER}", mode: int = 0o640) -> str:
    """The key as the documentation says to install it: root:qrouter 0640."""
    path = directory / "dkim.pem"
    path.write_bytes(pem)
    subprocess.run(["chown", owner, str(path)], check=True)
    path.chmod(mode)
    return str(path)


def txt_record(record: str) -> str:
    """A TXT record's data in zone-file syntax: strings of at most 255 characters."""
    return " ".join(f'"{record[at:at + 255]}"' for at in range(0, len(record), 255))


def zone(record: str) -> str:
    return f"""
_smtp._tls.partner.test. 60 IN TXT "v=TLSRPTv1; rua=mailto:{REPORTS}"
reports.test. 60 IN MX 10 mx.reports.test.
mx.reports.test. 60 IN A 127.0.0.4
{SELECTOR}._domainkey.{SIGNER}. 60 IN TXT {txt_record(record)}
"""


def a_day_over(spool: Path) -> str:
    """A spool of the daemon's user with one session to partner.test counted on a day that is
    over (as the SMTP transport counts one); the day."""
    Spool(spool).create()
    Recorder(str(spool), enabled=True).record("partner.test", "no-policy-found", (), "mx.partner.test", "",
                                              "192.0.2.1", "192.0.2.25")
    subprocess.run(["chown", "-R", DAEMON_USER, str(spool)], check=True)
    return end_the_day(spool)


def asking(server: DNSServer):
    """dkimpy's dnsfunc: the TXT record at `name`, asked of the loopback DNS server with dnspython."""

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        answer, _ = dns.query.udp_with_fallback(dns.message.make_query(name.decode(), "TXT"), server.host,
                                                timeout=timeout, port=server.port)
        for rrset in answer.answer:
            return b"".join(rrset[0].strings)
        return None

    return lookup


@pytest.mark.parametrize(("kind", "flags"), [
    ("rsa", ["--tls-report-contact", f"tlsrpt-reports@{SIGNER}"]),  # signed by the From: address's domain
    ("ed25519", ["--tls-report-dkim-domain", SIGNER]),  # From: postmaster@ME, signed by the domain named
])
def test_a_mailed_report_carries_a_dkim_signature_that_verifies(daemons, tmp_path, kind, flags):
    pem, record = key_pair(kind)
    (tmp_path / "keys").mkdir()
    key = key_file(reachable(tmp_path / "keys"), pem)
    spool = tmp_path / "spool"
    day = a_day_over(spool)
    port = free_port("127.0.0.4")
    with DNSServer(zone(record)) as server, AioServer(Sink(), host="127.0.0.4", port=port) as sink:
        daemon = daemons("--dns-servers", server.servers, "--smtp-port", str(port), "--tls-report", "yes",
                         "--tls-report-dkim-key", key, "--tls-report-dkim-selector", SELECTOR, *flags, *FAST,
                         maildir=False)  # the day is over: a network worker reports it at the start
        [mail] = wait_for(lambda: [m for m in sink.handler.messages if REPORTS in m.rcpt_tos], what="the report")
        # logged after the report is queued (and a journal fsync): it may be delivered first
        wait_for(lambda: f"TLS report on partner.test for {day}: queued for <{REPORTS}>" in daemon.log(),
                 what="the report logged")
        verify = asking(server)

        message = mail.content
        header, report = mailed_report(message)
        assert report["policies"][0]["summary"]["total-successful-session-count"] == 1
        signature = " ".join(header["DKIM-Signature"].split())
        algorithm = "rsa-sha256" if kind == "rsa" else "ed25519-sha256"
        assert f"a={algorithm}; c=relaxed/relaxed; d={SIGNER};" in signature and f"s={SELECTOR};" in signature
        assert "h=from : to : subject : date : message-id : mime-version : content-type : tls-report-domain : " \
               "tls-report-submitter : auto-submitted;" in signature, signature
        assert " l=" not in signature  # RFC 8460 5.3: the whole body is signed
        assert dkim.verify(message, dnsfunc=verify, tlsrpt="strict")  # as a receiver that takes reports only

        body = message.index(b"aggregate TLS report")
        changed = message[:body] + b"aggregate TLS rep0rt" + message[body + len(b"aggregate TLS report"):]
        assert not dkim.verify(changed, dnsfunc=verify, tlsrpt="strict")
        assert not dkim.verify(message.replace(b"Subject: Report Domain: partner.test", b"Subject: Report Domain: "
                                               b"partner.tesT"), dnsfunc=verify, tlsrpt="strict")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qrouter.conf"
    path.write_text(text)
    return path


def test_key_selector_and_domain_problems_name_the_file_and_line(tmp_path):
    pem, _ = key_pair("rsa")
    key = key_file(tmp_path, pem)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o640)
    other_curve = tmp_path / "ec.pem"
    other_curve.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    other_curve.chmod(0o600)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    encrypted.chmod(0o600)
    cases = [
        (f"tls-report-dkim-selector s1\ntls-report-dkim-key {tmp_path}/nope.pem\n",
         f"qrouter.conf:2: tls-report-dkim-key: {tmp_path}/nope.pem: cannot read DKIM key: No such file or directory"),
        (f"tls-report-dkim-key {garbage}\ntls-report-dkim-selector s1\n",
         f"qrouter.conf:1: tls-report-dkim-key: {garbage}: not a PEM private key"),
        (f"tls-report-dkim-key {other_curve}\ntls-report-dkim-selector s1\n",
         f"qrouter.conf:1: tls-report-dkim-key: {other_curve}: neither an RSA nor an Ed25519 key"),
        (f"tls-report-dkim-key {encrypted}\ntls-report-dkim-selector s1\n",
         f"qrouter.conf:1: tls-report-dkim-key: {encrypted}: the key is encrypted"),
        (f"tls-report-dkim-key {key}\ntls-report-dkim-selector tls_rpt\n",
         "qrouter.conf:2: tls-report-dkim-selector 'tls_rpt': must be DNS labels of letters, digits and hyphens"),
        (f"tls-report-dkim-key {key}\ntls-report-dkim-selector s1\ntls-report-dkim-domain -relay.test\n",
         "qrouter.conf:3: tls-report-dkim-domain '-relay.test': must be DNS labels"),
        (f"tls-report yes\ntls-report-dkim-key {key}\n",
         "qrouter.conf:2: tls-report-dkim-key needs tls-report-dkim-selector"),
        ("tls-report-dkim-selector s1\n", "qrouter.conf:1: tls-report-dkim-selector means nothing without "
                                          "tls-report-dkim-key"),
    ]
    for text, error in cases:
        with pytest.raises(ConfigError) as caught:
            load(str(write(tmp_path, text)))
        assert str(caught.value).startswith(f"{tmp_path}/{error}"), (text, str(caught.value))
    loaded = load(str(write(tmp_path, f"tls-report-dkim-key {key}\ntls-report-dkim-selector Mail.2026\n")))
    assert (loaded.tls_report_dkim_key, loaded.tls_report_dkim_selector) == (key, "mail.2026")
    with pytest.raises(ConfigError, match=r"^--tls-report-dkim-selector: tls-report-dkim-selector 'a\.\.b': must be "):
        load(None, {"tls-report-dkim-key": key, "tls-report-dkim-selector": "a..b"})


def test_a_key_others_may_read_is_refused(tmp_path):
    pem, _ = key_pair("ed25519")
    key = key_file(tmp_path, pem, mode=0o644)
    result = qrouter("check-config", "--queue-dir", str(tmp_path / "spool"), "--tls-report-dkim-key", key,
                     "--tls-report-dkim-selector", SELECTOR)
    assert result.returncode == 78, result
    assert f"qrouter: --tls-report-dkim-key: tls-report-dkim-key: {key}: others may read it (mode 0644); " \
           "make it 0640" in result.stderr.decode(), result.stderr


def test_check_config_finds_a_key_the_daemon_user_cannot_read_and_warns_of_unsigned_reports(tmp_path):
    """Read as root, a root:root 0600 key passes; the worker that signs runs as the daemon's
    user and could not read it, so check-config (and the start) refuse it. Without a key,
    check-config passes but warns that mailed reports go unsigned."""
    pem, _ = key_pair("rsa")
    spool = str(reachable(tmp_path) / "spool")
    key = key_file(tmp_path, pem, owner="root:root", mode=0o600)
    refused = qrouter("check-config", "--queue-dir", spool, "--tls-report", "yes", "--tls-report-dkim-key", key,
                      "--tls-report-dkim-selector", SELECTOR)
    assert refused.returncode == 78, refused
    assert f"qrouter: tls-report-dkim-key {key}: user {DAEMON_USER} cannot read it (root:root 600)" \
           in refused.stderr.decode(), refused.stderr
    warning = "qrouter: warning: tls-report yes without tls-report-dkim-key: reports to mailto: addresses go " \
              "unsigned, and RFC 8460 receivers may ignore unsigned reports (5.3)"
    unsigned = qrouter("check-config", "--queue-dir", spool, "--tls-report", "yes")
    assert unsigned.returncode == 0 and warning in unsigned.stdout.decode(), unsigned
    subprocess.run(["chown", f"root:{DAEMON_USER}", key], check=True)
    Path(key).chmod(0o640)
    signed = qrouter("check-config", "--queue-dir", spool, "--tls-report", "yes", "--tls-report-dkim-key", key,
                     "--tls-report-dkim-selector", SELECTOR)
    assert signed.returncode == 0 and "warning" not in signed.stdout.decode(), signed
    assert "warning" not in qrouter("check-config", "--queue-dir", spool, check=True).stdout.decode()


def test_a_report_that_cannot_be_signed_is_not_mailed_unsigned_but_tried_again(tmp_path):
    """`qrouter tls-report send` as root reads the config as root, then makes the reports as the
    daemon's user, as a network worker does: a key only root can read passes the first and is
    refused by the second, and the report is kept for later rather than mailed unsigned."""
    pem, record = key_pair("rsa")
    key = key_file(reachable(tmp_path), pem, owner="root:root", mode=0o600)
    spool = tmp_path / "spool"
    day = a_day_over(spool)
    with DNSServer(zone(record)) as server:
        said = qrouter("tls-report", "send", "--queue-dir", str(spool), "--dns-servers", server.servers,
                       "--tls-report-dkim-key", key, "--tls-report-dkim-selector", SELECTOR, check=True).stdout.decode()
    assert f"TLS report on partner.test for {day}: report not sent now, tried again later: cannot sign the report " \
           f"to <{REPORTS}>: {key}: cannot read DKIM key: Permission denied" in said, said
    assert list((spool / "incoming").iterdir()) == [] and (spool / "tls-report" / day).exists()
