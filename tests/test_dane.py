"""DANE (tls=dane, tls=dane-only) through the real daemon: a zone signed with ldns-signzone and
served by NSD, Unbound validating it against the test's trust anchor as the daemon's resolver
(dns-support-level dnssec), aiosmtpd with STARTTLS and certificates from a test CA as the MX
host, its TLSA records at _PORT._tcp of its name."""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from policy.dane import DANE_EE, TLSARecord, host_policy
from policy.destinations import load_destinations
from policy.tls_policy import TLS_DANE, TLS_DANE_ONLY, TLS_MAY, TLSPolicy
from policy.transport_map import PolicyError
from router.spool.queue_file import PENDING
from tests.daemon import qrouter, reachable, wait_for
from tests.dns_server import DNSServer
from tests.nsd_server import HOST, NSD
from tests.smtp_servers import AioServer
from tests.stripping_proxy import StrippingProxy
from tests.test_smtp_tls_auth import FAST, Sink, deferred, delivered, enqueue
from tests.test_tls_report import counted
from tests.unbound_server import Unbound, ZoneKeys
from workers.dane import matches

DOMAIN = "dane.test"
MX = f"mx.{DOMAIN}"
PLAIN = "plain"  # an unsigned zone, no trust anchor: what Unbound says of it is insecure
PLAIN_RELAY = f"relay.{PLAIN}"  # a host in it: a relay host whose address nobody validated
BODY = b"Subject: t\r\n\r\nonly the MX host DNSSEC names may read this\r\n"


class PKI:
    """A root CA, an intermediate under it, and the MX host's certificate from the intermediate."""

    def __init__(self) -> None:
        self.root = trustme.CA()
        self.intermediate = self.root.create_child_ca()
        self.leaf = self.intermediate.issue_cert(MX)

    def context(self, leaf: trustme.LeafCert | None = None) -> ssl.SSLContext:
        """A server context sending `leaf` (by default the MX host's) and the intermediate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        (leaf or self.leaf).configure_cert(context)
        return context

    @staticmethod
    def der(pem: trustme.Blob) -> bytes:
        return ssl.PEM_cert_to_DER_cert(pem.bytes().decode())

    def spki_sha256(self, leaf: trustme.LeafCert | None = None) -> str:
        certificate = x509.load_der_x509_certificate(self.der((leaf or self.leaf).cert_chain_pems[0]))
        key = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(key).hexdigest()

    def ee(self, leaf: trustme.LeafCert | None = None) -> str:
        """DANE-EE SPKI SHA-256 (3 1 1) of the leaf."""
        return f"3 1 1 {self.spki_sha256(leaf)}"

    def ta(self) -> str:
        """DANE-TA full certificate SHA-256 (2 0 1) of the intermediate."""
        return f"2 0 1 {hashlib.sha256(self.der(self.intermediate.cert_pem)).hexdigest()}"


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> ZoneKeys:
    return ZoneKeys("test.", tmp_path_factory.mktemp("zone-keys"))


def zone(port: int, *tlsa: str, address: str = "127.0.0.2") -> str:
    return (f"{DOMAIN}. 60 IN MX 10 {MX}.\n{MX}. 60 IN A {address}\n"
            + "".join(f"_{port}._tcp.{MX}. 60 IN TLSA {record}\n" for record in tlsa))


@contextmanager
def resolver(keys: ZoneKeys, zone_text: str, broken: str = "", plain_text: str = "") -> Iterator[Unbound]:
    """Unbound validating `zone_text`, signed, served by NSD, with `broken` (a piece of the signed
    file) changed after signing so its signature fails; and the unsigned zone `plain.`, whose
    domain has the signed MX host as its MX, and whose host PLAIN_RELAY has the MX host's
    address, with `plain_text` added."""
    signed = keys.sign(zone_text)
    if broken:
        assert broken in signed
        signed = signed.replace(broken, broken[::-1])
    plain_zone = f"{PLAIN}. 60 IN MX 10 {MX}.\n{PLAIN_RELAY}. 60 IN A 127.0.0.2\n{plain_text}"
    with NSD(signed, complete=True) as nsd, DNSServer(plain_zone, origin=f"{PLAIN}.") as plain:
        with Unbound({"test.": f"{HOST}@{nsd.port}", f"{PLAIN}.": f"{plain.host}@{plain.port}"}, [keys.ds]) as unbound:
            yield unbound


def attempt(daemons, dns_servers: str, server: AioServer, level: str, *flags: str,
            recipient: str = f"u@{DOMAIN}", support: str = "dnssec", home: str = "", port: int = 0):
    """Deliver one message under the TLS level `level` to `server` as the MX host (on `port`,
    by default the server's); the daemon and the queue id once the first attempt is over. A
    second daemon of a test needs a `home`."""
    daemon = daemons("--dns-servers", dns_servers, "--dns-support-level", support,
                     "--smtp-port", str(port or server.port), "--smtp-tls", level, *flags, *FAST,
                     maildir=False, home=home)
    queue_id = enqueue(daemon, [recipient], BODY)
    wait_for(lambda: f"{queue_id}: removed" in daemon.log() or (daemon.spool / "deferred" / queue_id).exists(),
             what=f"the first attempt at {queue_id}")
    return daemon, queue_id


def again_under_dane_only(daemons, daemon, dns_servers: str, server: AioServer, *flags: str, **where):
    """After `daemon`'s attempt, the same delivery by a second daemon under dane-only, the
    server's sink emptied first; that daemon and its queue id."""
    daemon.stop()
    server.handler.messages.clear()
    server.handler.commands.clear()
    return attempt(daemons, dns_servers, server, "dane-only", *flags, home="again", **where)


def sent(daemon, queue_id: str, sink: Sink, trust: str) -> None:
    """Delivered, over a session logged as `trust` (Verified, Untrusted)."""
    line = delivered(daemon, queue_id)
    assert "status=sent" in line, line
    [session] = [ln for ln in daemon.log().splitlines() if "TLS connection established to" in ln]
    assert f"{trust} TLS connection established to {MX}[127.0.0.2]:" in session, session
    assert sink.messages[0].content.endswith(b"only the MX host DNSSEC names may read this\r\n")


def refused(daemon, queue_id: str, sink: Sink, dsn: str, reason: str) -> None:
    """Deferred with `dsn` and `reason` in the recipient's reply and in the log line; the server
    took no mail."""
    [rcpt] = deferred(daemon, queue_id)
    assert (rcpt.state, rcpt.dsn) == (PENDING, dsn) and reason in rcpt.reply, rcpt.reply
    assert sink.messages == [] and not any(c.startswith(("MAIL", "RCPT")) for c in sink.commands)
    [line] = [ln for ln in daemon.log().splitlines() if f"{queue_id}: to=<" in ln]
    assert f"dsn={dsn}, status=deferred" in line and reason in line, line


# -- DANE authenticates ------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["dane", "dane-only"])
def test_dane_ee_match_delivers_verified(daemons, pki, keys, level):
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context()) as server, \
            resolver(keys, zone(server.port, pki.ee())) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, level)
    sent(daemon, queue_id, server.handler, "Verified")
    assert server.handler.sessions[0][0] == "TLSv1.3"


def test_dane_ee_ignores_names_and_the_ca(daemons, pki, keys):
    """DANE-EE binds the key to the host: a certificate for another name, from a CA nobody
    trusts, passes when its key is the one the TLSA record names (RFC 7672 3.1.1)."""
    stranger = trustme.CA().issue_cert("other.example")
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context(stranger)) as server, \
            resolver(keys, zone(server.port, pki.ee(stranger))) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane-only")
    sent(daemon, queue_id, server.handler, "Verified")


def test_dane_ta_match_delivers_verified(daemons, pki, keys):
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context()) as server, \
            resolver(keys, zone(server.port, pki.ta())) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane")
    sent(daemon, queue_id, server.handler, "Verified")


def test_dane_ta_needs_the_mx_host_name(daemons, pki, keys):
    """DANE-TA vouches for a CA, so the certificate it issued must name the host."""
    wrong_name = pki.intermediate.issue_cert("other.example")
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context(wrong_name)) as server, \
            resolver(keys, zone(server.port, pki.ta())) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane")
    refused(daemon, queue_id, server.handler, "4.7.5",
            f"not verified by DANE (TLSA {pki.ta()}) for {MX}, {DOMAIN}: the certificate names other.example")


# -- an MX host that is an alias (RFC 7672 2.2.2) ------------------------------------------------


BOX = f"box.{DOMAIN}"  # where the MX host name's CNAME leads


def alias_zone(port: int, at_target: str = "", at_name: str = "") -> str:
    """The MX host name a CNAME to BOX, with a TLSA record at BOX and one at the name, if given."""
    return (f"{DOMAIN}. 60 IN MX 10 {MX}.\n{MX}. 60 IN CNAME {BOX}.\n{BOX}. 60 IN A 127.0.0.2\n"
            + (f"_{port}._tcp.{BOX}. 60 IN TLSA {at_target}\n" if at_target else "")
            + (f"_{port}._tcp.{MX}. 60 IN TLSA {at_name}\n" if at_name else ""))


def named(context: ssl.SSLContext) -> list[str]:
    """The names the client asks for in SNI, as `context` (a server's) sees them."""
    seen: list[str] = []
    context.sni_callback = lambda _sock, name, _context: seen.append(name)
    return seen


def test_tlsa_records_at_the_cname_target_of_the_mx_host_come_first(daemons, pki, keys):
    """The MX host name is an alias DNSSEC validated: the TLSA records at its target count, not
    the name's own (whose record matches nothing here), SNI names the target, and a DANE-TA
    certificate may carry the target's name alone (RFC 7672 2.2.2, 3.2.2, 8.1)."""
    context = pki.context(pki.intermediate.issue_cert(BOX))
    asked = named(context)
    with AioServer(Sink(), host="127.0.0.2", tls_context=context) as server, \
            resolver(keys, alias_zone(server.port, pki.ta(), pki.ee(trustme.CA().issue_cert(MX)))) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane-only")
    sent(daemon, queue_id, server.handler, "Verified")
    assert asked == [BOX]


def test_tlsa_records_of_the_mx_host_name_when_its_cname_target_has_none(daemons, pki, keys):
    context = pki.context()
    asked = named(context)
    with AioServer(Sink(), host="127.0.0.2", tls_context=context) as server, \
            resolver(keys, alias_zone(server.port, at_name=pki.ee())) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane-only")
    sent(daemon, queue_id, server.handler, "Verified")
    assert asked == [MX]


def test_an_alias_whose_target_is_found_insecurely_has_the_tlsa_records_of_its_name(daemons, pki, keys):
    """The MX host name's CNAME is validated, its target is in the unsigned zone plain.: the
    host still has DANE, with the records at its own name (RFC 7672 2.2.2)."""
    target = f"mx.{PLAIN}"
    zone_text = (f"{DOMAIN}. 60 IN MX 10 {MX}.\n{MX}. 60 IN CNAME {target}.\n"
                 f"_{{port}}._tcp.{MX}. 60 IN TLSA {pki.ee()}\n")
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context()) as server, \
            resolver(keys, zone_text.format(port=server.port), plain_text=f"{target}. 60 IN A 127.0.0.2\n") as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane-only")
    sent(daemon, queue_id, server.handler, "Verified")


# -- DANE refuses ------------------------------------------------------------------------------


def test_mismatch_defers_and_sends_nothing(daemons, pki, keys):
    other = trustme.CA().issue_cert(MX)
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context()) as server, \
            resolver(keys, zone(server.port, pki.ee(other))) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane")
    refused(daemon, queue_id, server.handler, "4.7.5",
            f"not verified by DANE: no certificate it sent matches TLSA {pki.ee(other)}")


def test_sessions_under_dane_are_counted_for_tls_reports_under_the_tlsa_records(daemons, pki, keys):
    """With tls-report on: a session DANE authenticated and one whose certificate matched no
    record, each counted under policy type tlsa with the records as the policy's strings."""
    other = trustme.CA().issue_cert(MX)
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context()) as server:
        with resolver(keys, zone(server.port, pki.ee())) as unbound:
            daemon, queue_id = attempt(daemons, unbound.servers, server, "dane", "--tls-report", "yes")
        sent(daemon, queue_id, server.handler, "Verified")
        with resolver(keys, zone(server.port, pki.ee(other))) as unbound:
            second, queue_id = attempt(daemons, unbound.servers, server, "dane", "--tls-report", "yes",
                                       home="second")
        [rcpt] = deferred(second, queue_id)
        assert rcpt.dsn == "4.7.5", rcpt.reply
    for run, record, good, failures in ((daemon, pki.ee(), 1, []), (second, pki.ee(other), 0, ["tlsa-invalid"])):
        [entry] = counted(run.spool)
        [counted_under] = entry["policies"]
        assert (entry["domain"], counted_under["policy"]["policy-type"],
                counted_under["policy"]["policy-string"]) == (DOMAIN, "tlsa", [record]), entry
        assert counted_under["summary"] == {"total-successful-session-count": good,
                                            "total-failure-session-count": len(failures)}, counted_under
        assert [f["result-type"] for f in counted_under.get("failure-details", [])] == failures, counted_under


def test_server_withholding_starttls_is_a_downgrade(daemons, pki, keys):
    """TLSA records say the host does TLS: a session without STARTTLS is an attack, not a fallback."""
    with AioServer(Sink(), host="127.0.0.2") as server, resolver(keys, zone(server.port, pki.ee())) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane")
    refused(daemon, queue_id, server.handler, "4.7.4",
            f"TLS is required (DANE: {MX} has TLSA records), but was not offered by host {MX}[127.0.0.2]")


@pytest.mark.parametrize("level", ["dane", "dane-only"])
def test_a_stripped_starttls_defers_the_dane_levels_and_nothing_passes_in_clear(daemons, pki, keys, level):
    """An attacker on the path takes STARTTLS out of the EHLO reply of a host with usable TLSA
    records: the delivery waits, and nothing of the message crossed the path."""
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context()) as server, \
            StrippingProxy("127.0.0.3", "127.0.0.2", server.port) as proxy, \
            resolver(keys, zone(proxy.port, pki.ee(), address="127.0.0.3")) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, level, port=proxy.port)
        refused(daemon, queue_id, server.handler, "4.7.4",
                f"TLS is required (DANE: {MX} has TLSA records), but was not offered by host {MX}[127.0.0.3]")
    assert proxy.stripped >= 1
    assert b"MAIL FROM" not in proxy.from_client and b"RCPT TO" not in proxy.from_client
    assert b"only the MX host DNSSEC names may read this" not in proxy.from_client


def test_bogus_tlsa_answer_defers(daemons, pki, keys):
    """A TLSA record whose signature fails: Unbound answers SERVFAIL, and the host is not used,
    neither with DANE nor without."""
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context()) as server:
        record = pki.ee()
        with resolver(keys, zone(server.port, record), broken=record.split()[-1]) as unbound:
            daemon, queue_id = attempt(daemons, unbound.servers, server, "dane", "--tls-report", "yes")
    refused(daemon, queue_id, server.handler, "4.7.5",
            f"TLSA lookup for {MX} failed: DNS servers failed: Do53:{HOST}@{unbound.port} answered SERVFAIL")
    assert server.handler.commands == []  # not even connected to
    assert reported_failures(daemon) == [("tlsa", "dnssec-invalid", MX)]


# -- where DANE does not apply -----------------------------------------------------------------


def test_no_tlsa_records_is_may_under_dane_and_refused_under_dane_only(daemons, pki, keys):
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context()) as server, \
            resolver(keys, zone(server.port)) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane")
        sent(daemon, queue_id, server.handler, "Untrusted")
        daemon, queue_id = again_under_dane_only(daemons, daemon, unbound.servers, server, "--tls-report", "yes")
    refused(daemon, queue_id, server.handler, "4.7.5", f"DANE is required, but {MX} has no TLSA records")
    assert reported_failures(daemon) == [("tlsa", "dane-required", MX)]


UNUSABLE = ("1 1 1 " + "ab" * 32, "0 0 1 " + "cd" * 32, "3 2 1 " + "ef" * 32)  # PKIX-EE, PKIX-TA, unknown selector


def test_only_unusable_tlsa_records_require_tls_without_authentication_under_dane(daemons, keys):
    """Validated TLSA records, none of them usable, still say the host does TLS (RFC 7672 2.2):
    under dane TLS is required and any certificate will do, logged Untrusted, counted for TLS
    reports under the records as a success; dane-only does not use the host."""
    stranger = trustme.CA().issue_cert("other.example")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    stranger.configure_cert(context)
    with AioServer(Sink(), host="127.0.0.2", tls_context=context) as server, \
            resolver(keys, zone(server.port, *UNUSABLE)) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane", "--tls-report", "yes")
        sent(daemon, queue_id, server.handler, "Untrusted")
        [entry] = counted(daemon.spool)
        [under] = entry["policies"]
        assert (under["policy"]["policy-type"], sorted(under["policy"]["policy-string"])) == ("tlsa", sorted(UNUSABLE))
        assert under["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}, under
        daemon, queue_id = again_under_dane_only(daemons, daemon, unbound.servers, server, "--tls-report", "yes")
    refused(daemon, queue_id, server.handler, "4.7.5", f"DANE is required, but {MX} has no usable TLSA records")
    assert reported_failures(daemon) == [("tlsa", "dane-required", MX)]


def test_only_unusable_tlsa_records_and_no_starttls_defers_under_dane(daemons, keys):
    """TLS is required even though nothing can authenticate it: a server without STARTTLS gets
    nothing in clear."""
    with AioServer(Sink(), host="127.0.0.2") as server, resolver(keys, zone(server.port, *UNUSABLE)) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane", "--tls-report", "yes")
    refused(daemon, queue_id, server.handler, "4.7.4",
            f"TLS is required (DANE: {MX} has TLSA records, none of them usable), "
            f"but was not offered by host {MX}[127.0.0.2]")
    assert reported_failures(daemon) == [("tlsa", "starttls-not-supported", MX)]


def reported_failures(daemon) -> list[tuple[str, str, str]]:
    """(policy type, result type, MX host) of each failure the daemon counted for TLS reports."""
    return [(under["policy"]["policy-type"], failure["result-type"], failure["receiving-mx-hostname"])
            for entry in counted(daemon.spool) for under in entry["policies"]
            for failure in under.get("failure-details", [])]


def test_insecure_mx_disables_dane(daemons, pki, keys):
    """plain. is unsigned: its MX records name the signed MX host, whose TLSA record does not
    match, but an MX RRset nobody validated cannot bring DANE in (RFC 7672 2.2.1): dane is may,
    dane-only does not use the host."""
    other = trustme.CA().issue_cert(MX)
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context()) as server, \
            resolver(keys, zone(server.port, pki.ee(other))) as unbound:
        daemon, queue_id = attempt(daemons, unbound.servers, server, "dane", recipient=f"u@{PLAIN}")
        sent(daemon, queue_id, server.handler, "Untrusted")
        daemon, queue_id = again_under_dane_only(daemons, daemon, unbound.servers, server, recipient=f"u@{PLAIN}")
    refused(daemon, queue_id, server.handler, "4.7.5",
            f"DANE is required, but {MX} was not found by DNSSEC-validated MX and address records")


def test_ad_bit_of_a_resolver_not_declared_trusted_is_ignored(daemons, pki, keys):
    """A server that sets AD on every answer, unsigned zone and all: without dns-support-level
    dnssec its AD bit means nothing, so its (mismatching) TLSA record is never used."""
    other = trustme.CA().issue_cert(MX)
    with AioServer(Sink(), host="127.0.0.2", tls_context=pki.context()) as server, \
            DNSServer(zone(server.port, pki.ee(other)), authentic=True) as liar:
        daemon, queue_id = attempt(daemons, liar.servers, server, "dane", support="enabled")
        sent(daemon, queue_id, server.handler, "Untrusted")
        daemon, queue_id = again_under_dane_only(daemons, daemon, liar.servers, server, support="enabled")
    refused(daemon, queue_id, server.handler, "4.7.5", "DANE is required, but DNSSEC is not trusted")


# -- the parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("matching", [0, 1, 2])
def test_every_selector_and_matching_type_designates_the_certificate(pki, selector, matching):
    certificate = x509.load_der_x509_certificate(pki.der(pki.leaf.cert_chain_pems[0]))
    selected = (certificate.public_bytes(Encoding.DER) if selector == 0 else
                certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    data = {0: selected, 1: hashlib.sha256(selected).digest(), 2: hashlib.sha512(selected).digest()}[matching]
    assert matches(TLSARecord(DANE_EE, selector, matching, data), certificate)
    assert not matches(TLSARecord(DANE_EE, selector, matching, data[:-1] + bytes([data[-1] ^ 1])), certificate)


DANE_POLICY = TLSPolicy(TLS_DANE, match=(MX, DOMAIN))
EE = TLSARecord(DANE_EE, 1, 1, b"\1" * 32)
PKIX = TLSARecord(1, 1, 1, b"\1" * 32)


@pytest.mark.parametrize(("trusted", "secure", "tlsa", "under_dane", "under_dane_only"), [
    (True, True, ([EE, PKIX], True), "DANE", "DANE"),
    (False, True, None, "may", "DNSSEC is not trusted"),
    (True, False, None, "may", "was not found by DNSSEC-validated MX and address records"),
    (True, True, ([], True), "may", "has no TLSA records"),
    (True, True, ([EE], False), "may", "are not DNSSEC-validated"),
    (True, True, ([PKIX], True), "unauthenticated", "has no usable TLSA records"),
    (True, True, "DNS servers failed", "TLSA lookup for mx.dane.test failed", "TLSA lookup for mx.dane.test failed"),
])
def test_host_policy(trusted, secure, tlsa, under_dane, under_dane_only):
    for level, expected in ((TLS_DANE, under_dane), (TLS_DANE_ONLY, under_dane_only)):
        policy = host_policy(replace(DANE_POLICY, level=level), MX, trusted=trusted, secure=secure, tlsa=tlsa)
        if expected == "DANE":
            assert (policy.level, policy.tlsa, policy.refusal, policy.authenticated) == (level, (EE,), "", True)
        elif expected == "unauthenticated":
            assert (policy.level, policy.tlsa, policy.tlsa_unusable, policy.refusal) == (level, (), (PKIX,), "")
            assert policy.required and not policy.authenticated
        elif expected == "may":
            assert policy == TLSPolicy(TLS_MAY)
        else:
            assert expected in policy.refusal, policy


# -- route --resolve ---------------------------------------------------------------------------


def test_route_resolve_shows_dane_per_mx_host(tmp_path, pki, keys):
    with resolver(keys, zone(2525, pki.ee(), "1 1 1 " + "ab" * 32)) as unbound:
        args = ["route", f"u@{DOMAIN}", "--resolve", "--dns-servers", unbound.servers, "--dns-support-level",
                "dnssec", "--smtp-port", "2525", "--smtp-tls", "dane-only"]
        text = qrouter(*args, check=True).stdout.decode()
        answer = json.loads(qrouter(*args, "--json", check=True).stdout)
        plain = qrouter("route", f"u@{PLAIN}", *args[2:], check=True).stdout.decode()
    assert f"dane: {MX}: DANE, TLSA {pki.ee()}" in text, text
    assert answer["resolved"][0]["dane"] == {"applies": True, "tlsa": [pki.ee()], "note": ""}
    assert f"dane: {MX}: no DANE: DANE is required, but {MX} was not found by DNSSEC-validated" in plain, plain


def test_route_resolve_shows_the_alias_and_tls_without_authentication(pki, keys):
    """route --resolve asks where delivery asks: the TLSA records at the target of an alias, and
    says that unusable records make TLS required but unauthenticated."""
    args = ["--resolve", "--dns-support-level", "dnssec", "--smtp-port", "2525", "--smtp-tls", "dane"]
    with resolver(keys, alias_zone(2525, pki.ee())) as unbound:
        answer = json.loads(qrouter("route", f"u@{DOMAIN}", *args, "--dns-servers", unbound.servers, "--json",
                                    check=True).stdout)
        text = qrouter("route", f"u@{DOMAIN}", *args, "--dns-servers", unbound.servers, check=True).stdout.decode()
    [host] = answer["resolved"]
    assert (host["alias"], host["dane"]) == (BOX, {"applies": True, "tlsa": [pki.ee()], "note": ""}), host
    assert (f"cname: {MX} is an alias of {BOX}, validated to the end: TLSA records are asked there first\n"
            f"        dane: {MX}: DANE, TLSA {pki.ee()}") in text, text
    with resolver(keys, zone(2525, UNUSABLE[0])) as unbound:
        text = qrouter("route", f"u@{DOMAIN}", *args, "--dns-servers", unbound.servers, check=True).stdout.decode()
    assert (f"dane: {MX}: no DANE: TLS required, not authenticated: TLSA {UNUSABLE[0]} of {MX}, "
            "none of them usable") in text, text


def test_destinations_file_takes_the_dane_levels(tmp_path):
    path = tmp_path / "destinations"
    path.write_text(f"{DOMAIN} tls=dane-only protocols=>=TLSv1.3\n{PLAIN} tls=dane\n")
    rules = load_destinations(str(path))
    assert rules.for_tls(f"mx:{DOMAIN}").tls_policy("may") == TLSPolicy(TLS_DANE_ONLY, min_protocol="TLSv1.3")
    assert rules.for_tls(f"mx:{PLAIN}").tls_policy("may").level == TLS_DANE
    path.write_text(f"{DOMAIN} tls=dane match={MX}\n")
    with pytest.raises(PolicyError, match="match= is for tls=verify and tls=secure"):
        load_destinations(str(path))


def test_config_keys(tmp_path):
    result = qrouter("check-config", "--queue-dir", str(reachable(tmp_path)), "--dns-support-level", "secure")
    assert result.returncode != 0 and b"must be one of enabled, dnssec" in result.stderr
    assert qrouter("keys", check=True).stdout.decode().count("dns-support-level enabled|dnssec") == 1


def test_check_config_warns_of_dane_levels_while_dnssec_is_not_trusted(tmp_path):
    rules = tmp_path / "destinations"
    rules.write_text("example.org tls=verify\nbank.example tls=dane\n")
    spool = str(reachable(tmp_path))
    said = qrouter("check-config", "--queue-dir", spool, "--smtp-tls", "dane-only", "--destinations", str(rules),
                   check=True).stdout.decode()
    warnings = [line for line in said.splitlines() if line.startswith("qrouter: warning:")]
    assert warnings == [
        f"qrouter: warning: {place}: dns-support-level is enabled, so no DNSSEC answer is trusted: dane acts as "
        "may and dane-only defers every delivery; set dns-support-level dnssec with a validating resolver on "
        "loopback (dns-servers)" for place in ("smtp-tls dane-only", f"tls=dane ({rules}:2)")], said
    trusted = qrouter("check-config", "--queue-dir", spool, "--smtp-tls", "dane-only", "--destinations", str(rules),
                      "--dns-support-level", "dnssec", check=True).stdout.decode()
    assert "warning" not in trusted


@pytest.fixture(autouse=True)
def _tmp(tmp_path: Path) -> None:
    reachable(tmp_path)
