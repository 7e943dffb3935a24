"""TLS levels per destination (`tls=` in the destinations file), through the real daemon: MX
routing by a real DNS server to aiosmtpd servers with STARTTLS and certificates from a test CA,
a stripping proxy as the attacker on the path; `route` and `check-config` on the new keys."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from policy.destinations import load_destinations
from policy.transport_map import PolicyError
from router.daemon.status_socket import query
from router.spool.queue_file import PENDING
from tests.daemon import qrouter, reachable, wait_for
from tests.dns_server import DNSServer
from tests.smtp_servers import AioServer, free_port
from tests.stripping_proxy import StrippingProxy
from tests.test_metrics import scrape, value
from tests.test_smtp_tls_auth import FAST, Sink, deferred, delivered, enqueue
from workers.tls import name_matches

DOMAIN = "partner.test"
MX = "mx.partner.test"
ZONE = f"""
{DOMAIN}. 60 IN MX 10 {MX}.
{MX}. 60 IN A 127.0.0.2
hijacked.test. 60 IN MX 10 mx.evil.test.
mx.evil.test. 60 IN A 127.0.0.2
stripped.test. 60 IN MX 10 mx.stripped.test.
mx.stripped.test. 60 IN A 127.0.0.3
"""
BODY = b"Subject: t\r\n\r\nthe body nobody on the path may read\r\n"


class PKI:
    """A test CA the daemon trusts, and a server context for a certificate of any names."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = str(directory / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    def context(self, *names: str, ca: trustme.CA | None = None, newest: ssl.TLSVersion | None = None):
        """A server context with a certificate for `names` (from `ca`, by default the trusted one),
        speaking at most `newest`; and the certificate's DER bytes."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        issued = (ca or self.ca).issue_cert(*names)
        issued.configure_cert(context)
        if newest:
            context.maximum_version = newest
        return context, ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(reachable(tmp_path_factory.mktemp("pki")))


def destinations(tmp_path: Path, text: str) -> str:
    path = reachable(tmp_path) / "destinations"
    path.write_text(text)
    return str(path)


def attempt(daemons, tmp_path, pki, rules: str, context, *flags: str, recipient: str = f"u@{DOMAIN}"):
    """Deliver one message under these rules to a server with `context`; the server's sink, the
    daemon and the queue id, once the first attempt is over."""
    with AioServer(Sink(), host="127.0.0.2", tls_context=context) as server, DNSServer(ZONE) as dns:
        daemon = daemons("--dns-servers", dns.servers, "--smtp-port", str(server.port),
                         "--destinations", destinations(tmp_path, rules), "--smtp-tls-ca", pki.ca_file,
                         *flags, *FAST, maildir=False)
        queue_id = enqueue(daemon, [recipient], BODY)
        wait_for(lambda: f"{queue_id}: removed" in daemon.log() or (daemon.spool / "deferred" / queue_id).exists(),
                 what=f"the first attempt at {queue_id}")
    return server.handler, daemon, queue_id


def sent(daemon, queue_id: str) -> str:
    line = delivered(daemon, queue_id)
    assert "status=sent" in line, line
    return line


def refused(daemon, queue_id: str, sink: Sink, dsn: str, reason: str) -> None:
    """Deferred with `dsn` and `reason`, the server never asked to take mail."""
    [rcpt] = deferred(daemon, queue_id)
    assert (rcpt.state, rcpt.dsn) == (PENDING, dsn) and reason in rcpt.reply, rcpt.reply
    assert sink.messages == [] and not any(c.startswith(("MAIL", "RCPT")) for c in sink.commands)
    assert f"dsn={dsn}, status=deferred" in daemon.log()


def established(daemon, trust: str, host: str = MX) -> str:
    """The log line of the TLS session, Postfix's words."""
    [line] = [ln for ln in daemon.log().splitlines() if "TLS connection established to" in ln]
    assert f"{trust} TLS connection established to {host}[127.0.0.2]:" in line, line
    return line


# -- verify, secure ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "delivers"), [(MX, True), (DOMAIN, True), ("other.test", False)])
def test_verify_takes_a_certificate_for_the_mx_host_or_the_next_hop_domain(daemons, tmp_path, pki, name, delivers):
    context, _ = pki.context(name)
    sink, daemon, queue_id = attempt(daemons, tmp_path, pki, f"{DOMAIN} tls=verify\n", context)
    if delivers:
        sent(daemon, queue_id)
        line = established(daemon, "Verified")
        assert ": TLSv1.3 with cipher TLS_" in line and " bits)" in line
        assert sink.messages[0].content.endswith(b"the body nobody on the path may read\r\n")
    else:
        refused(daemon, queue_id, sink, "4.7.5", f"not verified for {MX}, {DOMAIN}: the certificate names other.test")


def test_verify_refuses_a_certificate_from_a_ca_not_trusted(daemons, tmp_path, pki):
    context, _ = pki.context(MX, ca=trustme.CA())
    sink, daemon, queue_id = attempt(daemons, tmp_path, pki, f"{DOMAIN} tls=verify\n", context)
    refused(daemon, queue_id, sink, "4.7.5", f"not verified for {MX}, {DOMAIN}: unable to get local issuer")


@pytest.mark.parametrize(("rule", "delivers"), [
    ("hijacked.test tls=verify", True),  # verify trusts the MX host name DNS gave
    ("hijacked.test tls=secure", False),  # secure does not: hijacked.test and names under it only
    ("hijacked.test tls=secure match=mx.evil.test", True),  # unless the policy names it
    ("hijacked.test tls=secure match=.partner.test:hijacked.test", False),
])
def test_secure_takes_names_from_the_policy_never_from_dns(daemons, tmp_path, pki, rule, delivers):
    context, _ = pki.context("mx.evil.test")
    sink, daemon, queue_id = attempt(daemons, tmp_path, pki, rule + "\n", context, recipient="u@hijacked.test")
    if delivers:
        sent(daemon, queue_id)
        established(daemon, "Verified", "mx.evil.test")
    else:
        refused(daemon, queue_id, sink, "4.7.5", "the certificate names mx.evil.test")


def test_secure_by_default_takes_the_next_hop_domain_and_names_under_it(daemons, tmp_path, pki):
    context, _ = pki.context(MX)
    _, daemon, queue_id = attempt(daemons, tmp_path, pki, f"{DOMAIN} tls=secure\n", context)
    sent(daemon, queue_id)


# -- fingerprint ----------------------------------------------------------------------------------


@pytest.mark.parametrize("digest", ["certificate", "public key", "wrong"])
def test_fingerprint_checks_the_digest_and_nothing_else(daemons, tmp_path, pki, digest):
    context, der = pki.context("whatever.test", ca=trustme.CA())  # no CA the daemon trusts, no name that fits
    key = x509.load_der_x509_certificate(der).public_key().public_bytes(Encoding.DER,
                                                                        PublicFormat.SubjectPublicKeyInfo)
    listed = {"certificate": hashlib.sha256(der).hexdigest(), "public key": hashlib.sha256(key).hexdigest(),
              "wrong": "ab" * 32}[digest]
    written = ":".join(listed[i:i + 2] for i in range(0, 64, 2)).upper()  # as openssl prints it
    rule = f"{DOMAIN} tls=fingerprint fingerprint={'00' * 32}|{written}\n"
    sink, daemon, queue_id = attempt(daemons, tmp_path, pki, rule, context)
    if digest == "wrong":
        refused(daemon, queue_id, sink, "4.7.5", "not verified by fingerprint")
    else:
        sent(daemon, queue_id)
        established(daemon, "Verified")


# -- none, may, protocols, the default ------------------------------------------------------------


def test_none_never_starts_tls_even_when_offered(daemons, tmp_path, pki):
    context, _ = pki.context(MX)
    sink, daemon, queue_id = attempt(daemons, tmp_path, pki, f"{DOMAIN} tls=none\n", context,
                                     "--smtp-tls", "verify")
    sent(daemon, queue_id)
    assert sink.handshakes == 0 and sink.sessions == [(None, None)]
    assert "TLS connection established" not in daemon.log()


def test_may_for_one_destination_falls_back_to_plain_text_where_the_default_would_defer(daemons, tmp_path, pki):
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: every handshake fails
    sink, daemon, queue_id = attempt(daemons, tmp_path, pki, f"{DOMAIN} tls=may\n", broken, "--smtp-tls", "verify")
    sent(daemon, queue_id)
    assert sink.sessions == [(None, None)] and len(sink.messages) == 1
    assert "retrying without TLS" in daemon.log()


@pytest.mark.parametrize("default", ["verify", "may"])
def test_the_default_level_applies_where_no_rule_sets_one(daemons, tmp_path, pki, default):
    context, _ = pki.context("other.test")
    flags = ["--smtp-tls", default] if default != "may" else []  # may: what a config that sets nothing gets
    sink, daemon, queue_id = attempt(daemons, tmp_path, pki, f"{DOMAIN} concurrency=5\n", context, *flags)
    if default == "verify":
        refused(daemon, queue_id, sink, "4.7.5", "not verified for")
    else:
        sent(daemon, queue_id)
        established(daemon, "Untrusted")  # a certificate nobody checked


@pytest.mark.parametrize(("minimum", "delivers"), [(">=TLSv1.3", False), (">=TLSv1.2", True)])
def test_a_minimum_protocol_refuses_an_older_server(daemons, tmp_path, pki, minimum, delivers):
    context, _ = pki.context(MX, newest=ssl.TLSVersion.TLSv1_2)
    sink, daemon, queue_id = attempt(daemons, tmp_path, pki, f"{DOMAIN} tls=verify protocols={minimum}\n", context)
    if delivers:
        sent(daemon, queue_id)
        assert ": TLSv1.2 with cipher " in established(daemon, "Verified")
    else:
        refused(daemon, queue_id, sink, "4.7.5", "TLS is required, but the handshake with")


# -- downgrade ----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["may", "encrypt", "verify", "secure", "fingerprint"])
def test_a_stripped_starttls_defers_every_level_above_may_and_nothing_passes_in_clear(daemons, tmp_path, pki,
                                                                                       level):
    context, _ = pki.context("mx.stripped.test")
    extra = f" fingerprint={'ab' * 32}" if level == "fingerprint" else ""
    with AioServer(Sink(), host="127.0.0.2", tls_context=context) as server, \
            StrippingProxy("127.0.0.3", "127.0.0.2", server.port) as proxy, DNSServer(ZONE) as dns:
        daemon = daemons("--dns-servers", dns.servers, "--smtp-port", str(proxy.port), "--destinations",
                         destinations(tmp_path, f"stripped.test tls={level}{extra}\n"), "--smtp-tls-ca", pki.ca_file,
                         *FAST, maildir=False)
        queue_id = enqueue(daemon, ["u@stripped.test"], BODY)
        if level == "may":  # the attack works on opportunistic TLS: that is why the other levels exist
            sent(daemon, queue_id)
            assert b"the body nobody on the path may read" in proxy.from_client
            return
        refused(daemon, queue_id, server.handler, "4.7.4",
                "TLS is required, but was not offered by host mx.stripped.test[127.0.0.3]")
    assert proxy.stripped >= 1
    assert b"the body nobody" not in proxy.from_client and b"MAIL FROM" not in proxy.from_client
    assert b"RCPT TO" not in proxy.from_client and b"STARTTLS" not in proxy.from_client


def test_a_callout_probe_goes_under_the_destination_s_tls_level_too(daemons, tmp_path, pki):
    """Recipient verification asks the next hop as delivery would: under tls=verify, a stripped
    STARTTLS ends the probe before MAIL FROM, and the answer is temporary, never a guess."""
    context, _ = pki.context("mx.stripped.test")
    with AioServer(Sink(), host="127.0.0.2", tls_context=context) as server, \
            StrippingProxy("127.0.0.3", "127.0.0.2", server.port) as proxy, DNSServer(ZONE) as dns:
        daemon = daemons("--dns-servers", dns.servers, "--smtp-port", str(proxy.port), "--destinations",
                         destinations(tmp_path, "stripped.test tls=verify callout=yes\n"), "--smtp-tls-ca",
                         pki.ca_file, *FAST, maildir=False)

        def answered() -> dict | None:
            answer = query(str(daemon.spool / "status.sock"), {"command": "verify", "recipient": "u@stripped.test"})
            return answer if answer.get("dsn") == "4.7.4" else None

        answer = wait_for(answered, 30, "the probe's answer")
        assert (answer["verdict"], answer["code"]) == ("temporary", 450), answer
        assert "TLS is required, but was not offered by host mx.stripped.test[127.0.0.3]" in answer["text"]
    assert proxy.stripped >= 1
    assert b"MAIL FROM" not in proxy.from_client and b"RCPT TO" not in proxy.from_client
    assert not any(c.startswith(("MAIL", "RCPT")) for c in server.handler.commands)


# -- what shows it: queue why, metrics, route, check-config -------------------------------------


def test_queue_why_and_the_metrics_show_the_tls_failure(daemons, tmp_path, pki):
    port = free_port()
    context, _ = pki.context("other.test")
    sink, daemon, queue_id = attempt(daemons, tmp_path, pki, f"{DOMAIN} tls=verify\n", context,
                                     "--metrics-listen", f"127.0.0.1:{port}")
    refused(daemon, queue_id, sink, "4.7.5", "not verified for")
    why = qrouter("queue", "why", queue_id, "--queue-dir", str(daemon.spool), check=True).stdout.decode()
    assert "4.7.5" in why and f"server certificate of {MX}[127.0.0.2]:" in why and "not verified for" in why, why

    def counted():
        families, _ = scrape(f"127.0.0.1:{port}")
        samples = [s for s in families.get("qrouter_smtp_tls_sessions", []) if s.name.endswith("_total")]
        return families if samples else None

    families = wait_for(counted, what="the TLS sessions counted")
    assert value(families, "qrouter_smtp_tls_sessions_total", level="verify", outcome="failed") == 1


def test_route_shows_the_level_and_where_it_comes_from(tmp_path):
    path = destinations(tmp_path, f"{DOMAIN} tls=secure match={DOMAIN}:.{DOMAIN} protocols=>=TLSv1.2\n"
                                  "smtp:[192.0.2.7]:2525 concurrency=3\n")
    out = qrouter("route", "--destinations", path, f"u@{DOMAIN}", check=True).stdout.decode()
    assert f"tls:       secure match={DOMAIN}:.{DOMAIN} protocols=>=TLSv1.2 (from {path}:1)\n" in out
    out = qrouter("route", "--destinations", path, "--smtp-tls", "encrypt", "u@example.org",
                  check=True).stdout.decode()
    assert "tls:       encrypt (from the smtp-tls key)\n" in out
    out = qrouter("route", "--destinations", path, "--relayhost", "[192.0.2.7]:2525", "--json", "u@example.org",
                  check=True).stdout.decode()
    assert '"source": "smtp-tls"' in out and '"level": "may"' in out
    out = qrouter("route", "--destinations", path, "--default-transport", "queue/discard", "u@example.org",
                  check=True).stdout.decode()
    assert "tls:" not in out  # no SMTP session


def test_route_resolve_shows_the_level_of_the_domain(tmp_path):
    path = destinations(tmp_path, f"{DOMAIN} tls=verify\n")
    with DNSServer(ZONE) as dns:
        out = qrouter("route", "--resolve", "--dns-servers", dns.servers, "--destinations", path, f"u@{DOMAIN}",
                      check=True).stdout.decode()
    assert f"tls:       verify (from {path}:1)\n" in out and f"{MX}" in out


BAD = f"""\
a.test tls=maybe
b.test tls=verify fingerprint={'ab' * 32}
c.test tls=fingerprint
d.test match=x.test
e.test tls=may protocols=>=TLSv1.2 match=x.test
f.test tls=secure match=bad_name!
g.test tls=verify protocols=TLSv1.2
h.test tls=fingerprint fingerprint=abcd
i.test protocols=>=TLSv1.3
good.test tls=secure match=good.test:.good.test protocols=>=TLSv1.3
"""


def test_check_config_names_every_bad_tls_key_with_file_and_line(tmp_path):
    path = destinations(tmp_path, BAD)
    with pytest.raises(PolicyError) as caught:
        load_destinations(path)
    problems = str(caught.value)
    expected = {1: "tls 'maybe': must be one of none, may, encrypt, verify, secure, fingerprint",
                2: "tls=fingerprint needs fingerprint=, and fingerprint= needs tls=fingerprint",
                3: "tls=fingerprint needs fingerprint=",
                4: "match= is for tls=verify and tls=secure",
                5: "match= is for tls=verify and tls=secure",
                6: "match 'bad_name!': 'bad_name!' is not a host name",
                7: "protocols 'TLSv1.2': must be >=VERSION",
                8: "fingerprint 'abcd': 'abcd' is not a SHA-256 digest",
                9: "protocols= needs a tls= level on the same line"}
    for line, says in expected.items():
        assert f"{path}:{line}: {says}" in problems, problems
    assert f"{path}:10" not in problems
    result = qrouter("check-config", "--destinations", path)
    assert result.returncode == 78
    assert all(f"{path}:{line}: ".encode() in result.stderr for line in expected)


def test_smtp_tls_takes_the_levels_that_need_nothing_beside_them():
    result = qrouter("check-config", "--smtp-tls", "fingerprint")
    assert result.returncode != 0 and b"must be one of none, may, encrypt, verify, secure" in result.stderr
    assert qrouter("check-config", "--smtp-tls", "secure").returncode == 0


@pytest.mark.parametrize(("presented", "wanted", "matches"), [
    ("mx.example.com", "MX.Example.com.", True),
    ("*.example.com", "mx.example.com", True),
    ("*.example.com", "a.mx.example.com", False),  # one label deep
    ("*.example.com", "example.com", False),
    ("*.com", "example.com", False),
    ("mx.example.com", ".example.com", True),
    ("example.com", ".example.com", False),
    ("2001:DB8:0:0:0:0:0:1", "2001:db8::1", True),  # ssl writes IPv6 addresses in full
    ("127.0.0.1", "127.0.0.2", False),
    ("127.0.0.1", "localhost", False),
])
def test_certificate_names_match_as_rfc_6125_says(presented, wanted, matches):
    assert name_matches(presented, wanted) == matches
