"""MTA-STS (RFC 8461) through the real daemon: the `_mta-sts` TXT record and the policy host's
address from a real DNS server, the policy from an HTTPS server on port 443 with a certificate of
a test CA, MX hosts that are aiosmtpd servers with STARTTLS; and the policy grammar on its own."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dns.zone
import pytest

from policy.mta_sts import STSError, mx_matches, parse_policy, parse_txt
from router.spool.queue_file import PENDING
from tests.daemon import qrouter, reachable, wait_for
from tests.dns_server import DNSServer, zone_file
from tests.smtp_servers import AioServer, free_port
from tests.test_smtp_tls_auth import FAST, Sink, deferred, delivered, enqueue
from tests.test_tls_policy import PKI, destinations
from tests.test_tls_report import counted
from workers.mta_sts import Policies
from workers.mx_lookup import make_resolver

DOMAIN = "sts.test"
MX, OTHER_MX = "mx.sts.test", "mx.other.test"
MX_IP, OTHER_IP, WEB_IP = "127.0.47.2", "127.0.47.3", "127.0.47.4"
POLICY_HOST = f"mta-sts.{DOMAIN}"
BODY = b"Subject: t\r\n\r\nfor the listed MX only\r\n"


def zone(policy_id: str = "one", *, mx: str = f"10 {MX}.", txt: bool = True) -> str:
    """The zone: DOMAIN's MX records, the addresses of both MX hosts and of the policy host, and
    the TXT record naming the policy's id (TTL 0: a change is seen at once)."""
    record = f'_mta-sts.{DOMAIN}. 0 IN TXT "v=STSv1; id={policy_id};"\n' if txt else ""
    return (f"{DOMAIN}. 60 IN MX {mx}\n{MX}. 60 IN A {MX_IP}\n{OTHER_MX}. 60 IN A {OTHER_IP}\n"
            f"{POLICY_HOST}. 60 IN A {WEB_IP}\n" + record)


def rezone(server: DNSServer, text: str) -> None:
    """Serve `text` from now on, as a zone's owner changes it."""
    server.zone = dns.zone.from_text(zone_file(text, server.origin), server.origin, relativize=False)


def policy(mode: str = "enforce", *mx: str, max_age: int = 86400) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {name}" for name in (mx or (MX,))), f"max_age: {max_age}"]
    return "\r\n".join(lines).encode() + b"\r\n"


class PolicyServer:
    """https://mta-sts.DOMAIN on WEB_IP:443 (the tests run as root), answering every GET with
    `answer` (status, Content-Type, body, more headers) and noting the paths and Host asked for."""

    def __init__(self, pki: PKI, body: bytes, name: str = POLICY_HOST) -> None:
        self.answer: tuple[int, str, bytes, dict[str, str]] = (200, "text/plain; charset=utf-8", body, {})
        self.requests: list[tuple[str, str]] = []
        self.context, _ = pki.context(name)  # its certificate's name
        self.server: ThreadingHTTPServer | None = None

    def __enter__(self) -> PolicyServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append((self.path, self.headers.get("Host", "")))
                status, content_type, body, headers = owner.answer
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((WEB_IP, 443), Handler)
        self.server.socket = self.context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(reachable(tmp_path_factory.mktemp("pki")))


def start(daemons, pki: PKI, dns: DNSServer, port: int, *flags: str, home: str = ""):
    return daemons("--dns-servers", dns.servers, "--smtp-port", str(port), "--smtp-tls-ca", pki.ca_file, *flags,
                   *FAST, maildir=False, home=home)


def first_attempt(daemon, queue_id: str) -> None:
    wait_for(lambda: f"{queue_id}: removed" in daemon.log() or (daemon.spool / "deferred" / queue_id).exists(),
             what=f"the first attempt at {queue_id}")


def sent_to(daemon, queue_id: str, host: str, ip: str) -> str:
    line = delivered(daemon, queue_id)
    assert "status=sent" in line and f"relay={host}[{ip}]:" in line, line
    return line


def held_back(daemon, queue_id: str, dsn: str, reason: str) -> None:
    [rcpt] = deferred(daemon, queue_id)
    assert (rcpt.state, rcpt.dsn) == (PENDING, dsn) and reason in rcpt.reply, rcpt.reply
    [line] = [ln for ln in daemon.log().splitlines() if f"{queue_id}: to=<" in ln]
    assert f"dsn={dsn}, status=deferred ({reason}" in line, line


def cached(daemon) -> dict:
    return json.loads((daemon.spool / "mta-sts" / DOMAIN).read_text())


def attempt(daemons, pki: PKI, certificate: str, served: bytes | tuple, *flags: str, listed: bool = True,
            policy_name: str = POLICY_HOST):
    """One message to u@DOMAIN, whose one MX host is MX (OTHER_MX unless `listed`): an aiosmtpd
    server with a certificate for `certificate`; the policy server (its certificate for
    `policy_name`) answering `served`, a policy or (status, Content-Type, body, headers). The
    MX server's Sink, the policy server, the daemon and the queue id, once the first attempt is over."""
    host, ip = (MX, MX_IP) if listed else (OTHER_MX, OTHER_IP)
    context, _ = pki.context(certificate)
    with AioServer(Sink(), host=ip, tls_context=context) as mx, DNSServer(zone(mx=f"10 {host}.")) as dns, \
            PolicyServer(pki, b"", name=policy_name) as web:
        web.answer = served if isinstance(served, tuple) else (200, "text/plain; charset=utf-8", served, {})
        daemon = start(daemons, pki, dns, mx.port, *flags)
        queue_id = enqueue(daemon, [f"u@{DOMAIN}"], BODY)
        first_attempt(daemon, queue_id)
    return mx.handler, web, daemon, queue_id


# -- enforce ---------------------------------------------------------------------------------------


def test_enforce_delivers_to_a_listed_mx_with_a_good_certificate_and_keeps_the_policy(daemons, pki):
    sink, web, daemon, queue_id = attempt(daemons, pki, MX, policy("enforce", MX))
    sent_to(daemon, queue_id, MX, MX_IP)
    assert sink.messages[0].content.endswith(b"for the listed MX only\r\n")
    assert sink.sessions[0][0] in ("TLSv1.2", "TLSv1.3")
    log = daemon.log()
    assert f"Verified TLS connection established to {MX}[{MX_IP}]:" in log
    assert f"(MTA-STS enforce policy of {DOMAIN})" in log
    assert f"MTA-STS enforce policy of {DOMAIN} fetched (id one): mode enforce, mx {MX}, max_age 86400" in log
    assert web.requests == [("/.well-known/mta-sts.txt", POLICY_HOST)]
    kept = cached(daemon)
    assert (kept["id"], kept["policy"]) == ("one", policy("enforce", MX).decode())
    assert kept["expires"] - kept["fetched"] == 86400


def test_enforce_leaves_out_an_mx_not_in_the_policy(daemons, pki):
    """The better MX is not in the policy: the message goes to the one that is, and the other
    is never connected to."""
    good, _ = pki.context(MX)
    other, _ = pki.context(OTHER_MX)
    port = free_port(MX_IP)
    with AioServer(Sink(), host=MX_IP, port=port, tls_context=good) as mx, \
            AioServer(Sink(), host=OTHER_IP, port=port, tls_context=other) as unlisted, \
            DNSServer(zone(mx=f"10 {OTHER_MX}.\n{DOMAIN}. 60 IN MX 20 {MX}.")) as dns, \
            PolicyServer(pki, policy("enforce", MX)):
        daemon = start(daemons, pki, dns, port)
        queue_id = enqueue(daemon, [f"u@{DOMAIN}"], BODY)
        sent_to(daemon, queue_id, MX, MX_IP)
    assert len(mx.handler.messages) == 1
    assert unlisted.handler.hellos == [] and unlisted.handler.messages == []
    assert f"MTA-STS enforce policy of {DOMAIN}: {OTHER_MX} not in the policy's mx list; not used" in daemon.log()


def test_enforce_defers_when_no_mx_is_in_the_policy(daemons, pki):
    sink, _, daemon, queue_id = attempt(daemons, pki, OTHER_MX, policy("enforce", MX, "*.sts.test"), listed=False)
    held_back(daemon, queue_id, "4.7.0", f"MTA-STS enforce policy of {DOMAIN}: {OTHER_MX} not in the policy's mx list")
    assert sink.hellos == [] and sink.messages == []


def test_enforce_defers_a_certificate_for_another_name_and_sends_nothing(daemons, pki):
    """The default level (may) would deliver to this server; the policy does not."""
    sink, _, daemon, queue_id = attempt(daemons, pki, "other.test", policy("enforce", MX))
    held_back(daemon, queue_id, "4.7.5", f"MTA-STS enforce policy of {DOMAIN}: server certificate of "
              f"{MX}[{MX_IP}]:")
    assert f"not verified for {MX}: the certificate names other.test" in daemon.log()
    assert sink.messages == [] and not any(c.startswith(("MAIL", "RCPT")) for c in sink.commands)
    assert sink.handshakes == 1  # no second try in plain text


def test_an_explicit_tls_rule_wins_over_the_policy(daemons, pki, tmp_path):
    _, web, daemon, queue_id = attempt(daemons, pki, "other.test", policy("enforce", MX),
                                       "--destinations", destinations(tmp_path, f"{DOMAIN} tls=may\n"))
    sent_to(daemon, queue_id, MX, MX_IP)
    assert web.requests == [] and "MTA-STS" not in daemon.log()


# -- testing, none -------------------------------------------------------------------------------


def test_testing_delivers_anyway_and_logs_what_enforce_would_have_refused(daemons, pki):
    sink, _, daemon, queue_id = attempt(daemons, pki, "other.test", policy("testing", MX))
    sent_to(daemon, queue_id, MX, MX_IP)
    assert len(sink.messages) == 1
    log = daemon.log()
    assert f"{queue_id}: MTA-STS testing policy of {DOMAIN}: server certificate of {MX}[{MX_IP}]:" in log
    assert (f"not verified for {MX}: the certificate names other.test (result certificate-host-mismatch); "
            "delivering as without the policy") in log
    assert f"Untrusted TLS connection established to {MX}[{MX_IP}]" in log  # the default level, may


def test_sessions_under_a_policy_are_counted_for_tls_reports_under_it(daemons, pki):
    """With tls-report on, a failure under a testing policy is counted as the policy's (type sts,
    its lines, its mx patterns), once: the session that then delivers without the policy is not
    counted again."""
    _, _, daemon, queue_id = attempt(daemons, pki, "other.test", policy("testing", MX), "--tls-report", "yes")
    sent_to(daemon, queue_id, MX, MX_IP)
    [entry] = counted(daemon.spool)
    assert entry["domain"] == DOMAIN, entry
    [under] = entry["policies"]
    assert under["policy"] == {"policy-type": "sts", "policy-string": [
        "version: STSv1", "mode: testing", f"mx: {MX}", "max_age: 86400"], "policy-domain": DOMAIN,
        "mx-host": [MX]}, under
    assert under["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    [failure] = under["failure-details"]
    assert (failure["result-type"], failure["receiving-mx-hostname"], failure["receiving-ip"]) == (
        "certificate-host-mismatch", MX, MX_IP), failure


def test_testing_uses_an_mx_not_in_the_policy_and_says_so(daemons, pki):
    _, _, daemon, queue_id = attempt(daemons, pki, OTHER_MX, policy("testing", MX), listed=False)
    sent_to(daemon, queue_id, OTHER_MX, OTHER_IP)
    assert (f"MTA-STS testing policy of {DOMAIN}: {OTHER_MX} not in the policy's mx list; used all the same "
            "(testing, result validation-failure)") in daemon.log()


def test_mode_none_is_no_policy(daemons, pki):
    served = policy("none", max_age=600).replace(f"mx: {MX}\r\n".encode(), b"")
    _, _, daemon, queue_id = attempt(daemons, pki, "other.test", served)
    sent_to(daemon, queue_id, MX, MX_IP)
    assert f"MTA-STS none policy of {DOMAIN} fetched (id one)" in daemon.log()
    assert cached(daemon)["id"] == "one"  # kept: it replaces an enforce policy cached before


# -- a fetch that gives no policy ----------------------------------------------------------------


@pytest.mark.parametrize(("answer", "said"), [
    ((301, "text/html", b"", {"Location": "https://elsewhere.test/policy"}),
     "answered HTTP 301 (a redirect to https://elsewhere.test/policy, which MTA-STS does not follow) "
     "(sts-policy-fetch-error)"),
    ((200, "text/plain", policy() + b"x" * 70000, {}), "the policy is larger than 65536 bytes (sts-policy-invalid)"),
    ((200, "text/html", policy(), {}), "Content-Type 'text/html', not text/plain (sts-policy-invalid)"),
    ((200, "text/plain", b"version: STSv1\nmode: strict\nmx: mx.sts.test\nmax_age: 60\n", {}),
     "line 2: mode 'strict'; it must be one of enforce, testing, none (sts-policy-invalid)"),
])
def test_a_fetch_that_fails_gives_no_policy_and_is_logged(daemons, pki, answer, said):
    _, _, daemon, queue_id = attempt(daemons, pki, "other.test", answer, "--tls-report", "yes")
    sent_to(daemon, queue_id, MX, MX_IP)  # under the default level, may: the certificate unchecked
    assert f"MTA-STS policy of {DOMAIN} (id one) not fetched: https://{POLICY_HOST}/.well-known/mta-sts.txt" in \
        daemon.log()
    assert f"{said}; delivering as without a policy" in daemon.log()
    assert not (daemon.spool / "mta-sts" / DOMAIN).exists()
    failures = [(under["policy"]["policy-type"], failure["result-type"]) for entry in counted(daemon.spool)
                if entry["domain"] == DOMAIN for under in entry["policies"]
                for failure in under.get("failure-details", [])]
    assert failures == [("sts", said.rpartition("(")[2].rstrip(")"))]  # counted for TLS reports


def test_a_policy_server_with_a_certificate_for_another_name_gives_no_policy(daemons, pki):
    _, _, daemon, queue_id = attempt(daemons, pki, "other.test", policy(), policy_name="www.other.test")
    sent_to(daemon, queue_id, MX, MX_IP)
    assert "TLS failed" in daemon.log() and "(sts-webpki-invalid); delivering as without a policy" in daemon.log()


# -- the cache and refreshing ----------------------------------------------------------------------


def test_the_cached_policy_survives_a_restart_while_dns_and_https_are_down(daemons, pki):
    good, _ = pki.context(MX)
    wrong, _ = pki.context("other.test")
    port = free_port(MX_IP)
    with DNSServer(zone()) as dns:
        with AioServer(Sink(), host=MX_IP, port=port, tls_context=good), PolicyServer(pki, policy("enforce", MX)):
            first = start(daemons, pki, dns, port)
            sent_to(first, enqueue(first, [f"u@{DOMAIN}"], BODY), MX, MX_IP)
        assert first.stop() == 0
        dns.servfail(f"_mta-sts.{DOMAIN}")  # the TXT record cannot be had, and no web server answers
        dns.servfail(POLICY_HOST)
        with AioServer(Sink(), host=MX_IP, port=port, tls_context=wrong) as mx:
            second = start(daemons, pki, dns, port)
            queue_id = enqueue(second, [f"u@{DOMAIN}"], BODY)
            held_back(second, queue_id, "4.7.5", f"MTA-STS enforce policy of {DOMAIN}: server certificate of "
                      f"{MX}[{MX_IP}]:{port} not verified for {MX}")
    assert mx.handler.messages == []


def test_a_new_txt_id_fetches_the_policy_again(daemons, pki):
    good, _ = pki.context(MX)
    with AioServer(Sink(), host=MX_IP, tls_context=good) as mx, DNSServer(zone("one")) as dns, \
            PolicyServer(pki, policy("enforce", MX)) as web:
        daemon = start(daemons, pki, dns, mx.port)
        sent_to(daemon, enqueue(daemon, [f"u@{DOMAIN}"], BODY), MX, MX_IP)
        sent_to(daemon, enqueue(daemon, [f"v@{DOMAIN}"], BODY), MX, MX_IP)
        assert len(web.requests) == 1  # the same id: the policy kept is used
        web.answer = (200, "text/plain", policy("enforce", "*.elsewhere.test"), {})
        rezone(dns, zone("two"))
        queue_id = enqueue(daemon, [f"w@{DOMAIN}"], BODY)
        held_back(daemon, queue_id, "4.7.0", f"MTA-STS enforce policy of {DOMAIN}: {MX} not in the policy's mx list")
    assert len(web.requests) == 2
    assert f"MTA-STS enforce policy of {DOMAIN} fetched (id two): mode enforce, mx *.elsewhere.test" in daemon.log()
    assert cached(daemon)["id"] == "two"
    assert len(mx.handler.messages) == 2


# -- qrouter route --resolve ---------------------------------------------------------------------


def test_route_resolve_shows_the_policy_and_where_it_came_from(daemons, pki, tmp_path):
    good, _ = pki.context(MX)
    with AioServer(Sink(), host=MX_IP, tls_context=good) as mx, DNSServer(zone()) as dns, \
            PolicyServer(pki, policy("enforce", MX)):
        flags = ["--dns-servers", dns.servers, "--smtp-tls-ca", pki.ca_file]
        spool = tmp_path / "spool"
        out = qrouter("route", "--resolve", *flags, "--queue-dir", str(spool), f"u@{DOMAIN}", check=True)
        assert (f"mta-sts:   enforce policy of {DOMAIN}: mx {MX}, max_age 86400, id one (fetched from "
                f"https://{POLICY_HOST}/.well-known/mta-sts.txt, expires ") in out.stdout.decode()
        assert not (spool / "mta-sts").exists()  # route reads the cache, never writes it
        daemon = start(daemons, pki, dns, mx.port)
        sent_to(daemon, enqueue(daemon, [f"u@{DOMAIN}"], BODY), MX, MX_IP)
        out = qrouter("route", "--resolve", *flags, "--queue-dir", str(daemon.spool), f"u@{DOMAIN}", check=True)
    assert f"id one (from the cache {daemon.spool / 'mta-sts' / DOMAIN}, expires " in out.stdout.decode()
    out = qrouter("route", "--resolve", "--dns-servers", dns.servers, "--queue-dir", str(tmp_path),
                  "--destinations", destinations(tmp_path, f"{DOMAIN} tls=verify\n"), f"u@{DOMAIN}", check=True)
    assert "mta-sts:" not in out.stdout.decode()  # a tls= rule wins
    out = qrouter("route", "--resolve", "--dns-servers", dns.servers, "--queue-dir", str(tmp_path),
                  "--smtp-tls", "dane-only", f"u@{DOMAIN}", check=True)
    assert "mta-sts:" not in out.stdout.decode()  # as delivery: dane-only never takes a policy instead


# -- the grammar ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("records", "expected"), [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=spf1 -all", "v=STSv1;id=abc"], "abc"),
    (["v=spf1 -all"], None),
    ([], None),
])
def test_txt_records_give_the_policy_id(records, expected):
    assert parse_txt(records, DOMAIN) == expected


@pytest.mark.parametrize(("records", "error"), [
    (["v=STSv1; id=a;", "v=STSv1; id=b;"], "2 TXT records begin with v=STSv1; there must be one"),
    (["v=STSv1;"], "has no id="),
    (["v=STSv1; id=not-alnum"], "id 'not-alnum' must be 1 to 32 letters and digits"),
    (["v=STSv1x; id=a"], "must begin with v=STSv1;"),
])
def test_a_bad_txt_record_is_refused_with_the_reason(records, error):
    with pytest.raises(STSError, match=error):
        parse_txt(records, DOMAIN)


@pytest.mark.parametrize(("text", "error"), [
    ("mode: enforce\nmx: a.test\nmax_age: 60\n", "no version field"),
    ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 60\n", "line 1: version 'STSv2'"),
    ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n", "line 4: max_age '31557601'"),
    ("version: STSv1\nmode: enforce\nmax_age: 60\n", "mode enforce needs at least one `mx:` line"),
    ("version: STSv1\nmode: enforce\nmx: *.*.test\nmax_age: 60\n", "line 3: mx '*.*.test' must be a host name"),
    ("version: STSv1\nthis is no field\n", "line 2: 'this is no field' is not `key: value`"),
])
def test_a_bad_policy_is_refused_with_its_line(text, error):
    with pytest.raises(STSError, match=error.replace("*", r"\*")):
        parse_policy(text, "POLICY")


def test_a_policy_takes_crlf_or_lf_unknown_fields_and_the_first_of_a_repeated_one():
    parsed = parse_policy("version: STSv1\r\nmode: testing\r\nmode: enforce\r\nmx: MX1.Example.com.\r\n"
                          "extension: whatever\r\nmx: *.example.net\r\nmax_age: 31557600\r\n", "POLICY")
    assert (parsed.mode, parsed.mx, parsed.max_age) == ("testing", ("mx1.example.com", "*.example.net"), 31557600)


@pytest.mark.parametrize(("pattern", "host", "matches"), [
    ("mx.example.com", "MX.example.com.", True),
    ("*.example.com", "mx.example.com", True),
    ("*.example.com", "a.mx.example.com", False),
    ("*.example.com", "example.com", False),
    ("mx.example.com", "mx2.example.com", False),
])
def test_mx_patterns_match_as_rfc_8461_says(pattern, host, matches):
    assert mx_matches(pattern, host) == matches


# -- lifetimes, asked of a worker's Policies directly ----------------------------------------------


def policies(dns: DNSServer, spool: Path, pki: PKI) -> Policies:
    return Policies(make_resolver(dns.servers, 5.0), str(spool), pki.ca_file)


def test_a_policy_is_fetched_again_halfway_through_its_max_age_and_dropped_when_it_expires(pki, tmp_path):
    with DNSServer(zone()) as dns, PolicyServer(pki, policy("enforce", MX, max_age=1000)) as web:
        found = policies(dns, tmp_path, pki).lookup(DOMAIN, now=10_000.0)
        assert (found.source, found.expires) == ("fetched", 11_000.0)
        later = policies(dns, tmp_path, pki)  # a restarted worker: the spool's copy
        assert later.lookup(DOMAIN, now=10_400.0).source == "cache" and len(web.requests) == 1
        assert later.lookup(DOMAIN, now=10_600.0).source == "fetched" and len(web.requests) == 2  # past half
        dns.servfail(f"_mta-sts.{DOMAIN}")
        asked = len(dns.queries)
        assert later.lookup(DOMAIN, now=11_500.0).source == "cache"  # DNS down: the copy while it lasts
        assert later.lookup(DOMAIN, now=11_600.0) is None  # expired
        assert [query.rdtype for query in dns.queries[asked:]] == ["TXT"]  # a failed lookup is not repeated at once
    assert not (tmp_path / "mta-sts" / DOMAIN).exists()


def test_a_failed_refresh_keeps_the_cached_policy_and_is_not_retried_at_once(pki, tmp_path):
    with DNSServer(zone("one")) as dns, PolicyServer(pki, policy("enforce", MX)) as web:
        worker = policies(dns, tmp_path, pki)
        assert worker.lookup(DOMAIN, now=1_000.0).policy_id == "one"
        rezone(dns, zone("two"))
        web.answer = (404, "text/plain", b"gone", {})
        kept = worker.lookup(DOMAIN, now=1_001.0)
        assert (kept.policy_id, kept.source) == ("one", "cache")
        assert worker.lookup(DOMAIN, now=1_002.0).policy_id == "one" and len(web.requests) == 2
        web.answer = (200, "text/plain", policy("testing", MX), {})
        assert worker.lookup(DOMAIN, now=1_400.0).policy.mode == "testing" and len(web.requests) == 3
