"""`qrouter route` with config flags and `--resolve` (DNS as delivery would see it), and
`qrouter status` with config flags."""

from __future__ import annotations

import json

import pytest
import typer

from router.admin.cli import app
from tests import test_dane
from tests.daemon import qrouter
from tests.dns_server import DNSServer
from tests.test_dane import MX, PLAIN_RELAY, zone
from tests.test_dane import resolver as dane_resolver

ZONE = """
two           MX 20 mx2
              MX 10 mx1
mx1           A 127.0.0.2
              AAAA ::1
mx2           A 127.0.0.3
nullmx        MX 0 .
relay         A 127.0.0.7
"""

def route(*args: str) -> str:
    return qrouter("route", *args, check=True).stdout.decode()


def route_json(*args: str) -> dict:
    return json.loads(route("--json", *args))


# -- item 10: every command that reads the config takes the config flags ------------------------

def test_route_takes_default_transport_flag(tmp_path):
    out = route("--default-transport", f"queue/maildir {tmp_path}/%d/%u", "user@example.org")
    assert f"next hop:  queue/maildir {tmp_path}/%d/%u" in out
    assert "MX routing" not in out


def test_route_takes_transports_flag(tmp_path):
    transports = tmp_path / "transports"
    transports.write_text("example.org  [192.0.2.1]:2525\n")
    answer = route_json("--transports", str(transports), "user@example.org")
    assert answer["next_hop"] == "[192.0.2.1]:2525"
    assert answer["rule"] == f"{transports}:1"


def test_route_takes_relayhost_flag():
    answer = route_json("--relayhost", "[192.0.2.9]", "user@example.org")
    assert answer["next_hop"] == "[192.0.2.9]"
    assert answer["reason"] == "relayhost"


def test_route_help_says_resolve_is_explicit():
    out = qrouter("route", "--help", check=True).stdout.decode()
    assert "--resolve" in out and "--default-transport" in out


def test_status_takes_config_flags(tmp_path, daemons):
    socket_path = tmp_path / "elsewhere.sock"
    daemon = daemons("--status-socket", str(socket_path))
    assert socket_path.exists()
    result = qrouter("status", "--json", "--queue-dir", str(daemon.spool), "--status-socket", str(socket_path))
    assert result.returncode == 0, result.stderr.decode()
    answer = json.loads(result.stdout)
    assert answer["queue_dir"] == str(daemon.spool)
    # without the flag the default socket is asked, where no daemon listens
    assert qrouter("status", "--queue-dir", str(daemon.spool)).returncode == 75


def test_status_defines_queue_dir_once():
    command = typer.main.get_command(app).commands["status"]
    options = [option for param in command.params for option in param.opts]
    assert options.count("--queue-dir") == 1
    assert "--status-socket" in options


# -- item 9: --resolve asks DNS as delivery would ----------------------------------------------

def test_route_without_resolve_asks_no_dns():
    with DNSServer(ZONE) as dns:
        out = route("--dns-servers", dns.servers, "user@two.test")
        assert dns.queries == []
    assert "next hop:  MX routing for two.test" in out


def test_resolve_shows_mx_hosts_in_order_with_addresses():
    with DNSServer(ZONE) as dns:
        out = route("--resolve", "--dns-servers", dns.servers, "user@two.test")
        answer = route_json("--resolve", "--dns-servers", dns.servers, "user@two.test")
    assert out.index("mx1.test") < out.index("mx2.test")
    assert "127.0.0.2, ::1" in out and "127.0.0.3" in out
    assert "shuffled" in out
    assert answer["resolved"] == [
        {"host": "mx1.test", "preference": 10, "addresses": ["127.0.0.2", "::1"]},
        {"host": "mx2.test", "preference": 20, "addresses": ["127.0.0.3"]},
    ]
    assert "error" not in answer


@pytest.mark.parametrize(("address", "said", "dsn"), [
    ("user@nullmx.test", "would bounce: null MX (5.1.10)", "5.1.10"),
    ("user@nowhere.test", "would bounce: no such domain (5.1.2)", "5.1.2"),
], ids=["null-mx", "no-such-domain"])
def test_resolve_says_when_mail_would_bounce(address, said, dsn):
    with DNSServer(ZONE) as dns:
        out = route("--resolve", "--dns-servers", dns.servers, address)
        answer = route_json("--resolve", "--dns-servers", dns.servers, address)
    assert said in out
    assert answer["error"]["dsn"] == dsn
    assert "resolved" not in answer


def test_resolve_temporary_failure():
    with DNSServer(ZONE) as dns:
        dns.servfail("two.test.")
        out = route("--resolve", "--dns-servers", dns.servers, "user@two.test")
    assert "DNS lookup failed now (4.4.3): " in out


def test_resolve_relayhost_by_name():
    with DNSServer(ZONE) as dns:
        answer = route_json("--resolve", "--dns-servers", dns.servers, "--relayhost", "[relay.test]:2525",
                            "user@example.org")
    assert answer["resolved"] == [{"host": "relay.test", "preference": 0, "addresses": ["127.0.0.7"]}]


def test_resolve_maildir_has_nothing_to_resolve(tmp_path):
    out = route("--resolve", "--default-transport", f"queue/maildir {tmp_path}/%d/%u", "user@example.org")
    assert "resolved:" in out and "no DNS" in out


# -- --resolve shows the TLS of each relay host as delivery decides it -------------------------


pki, keys = test_dane.pki, test_dane.keys  # its fixtures: the test CA and the signed zone's keys, made once here too


def dnssec_route(unbound, *args: str) -> tuple[str, dict]:
    """route --resolve asking `unbound` as a trusted validating resolver: the text and the JSON."""
    flags = ("--resolve", "--dns-servers", unbound.servers, "--dns-support-level", "dnssec", *args)
    return route(*flags), route_json(*flags)


def test_resolve_relay_host_under_dane_shows_its_tlsa_records(tmp_path, pki, keys):
    """A relay host in a signed zone with TLSA records at the port it is reached on: the level
    from the destinations line, the host validated, the usable records delivery would match."""
    rules = tmp_path / "destinations"
    rules.write_text(f"smtp:[{MX}]:2525 tls=dane\n")
    records = [pki.ee(), pki.ta()]
    with dane_resolver(keys, zone(2525, *records, "1 1 1 " + "ab" * 32)) as unbound:
        text, answer = dnssec_route(unbound, "--relayhost", f"[{MX}]:2525", "--destinations", str(rules),
                                    "u@example.org")
    assert f"tls:       dane (from {rules}:1)" in text, text
    assert f"      0 {MX}  127.0.0.2  (DNSSEC-validated)" in text, text
    [dane_line] = [line for line in text.splitlines() if f"dane: {MX}: " in line]
    assert dane_line.startswith(f"        dane: {MX}: DANE, TLSA ") and all(r in dane_line for r in records), text
    assert f"tls: {MX}:2525: dane, the certificate must name {MX}" in text, text  # DANE-TA checks the name
    [host] = answer["resolved"]
    assert (host["host"], host["addresses"], host["dnssec"]) == (MX, ["127.0.0.2"], True)
    assert host["tls"] == {"level": "dane", "port": 2525, "match": [MX]}
    assert host["dane"]["applies"] and sorted(host["dane"]["tlsa"]) == sorted(records), host
    assert answer["tls"]["source"] == f"{rules}:1"


def test_resolve_relay_host_in_an_unsigned_zone_under_dane_only_is_not_used(pki, keys):
    with dane_resolver(keys, zone(2525, pki.ee())) as unbound:
        text, answer = dnssec_route(unbound, "--relayhost", f"[{PLAIN_RELAY}]:2525", "--smtp-tls", "dane-only",
                                    "u@example.org")
    assert "tls:       dane-only (from the smtp-tls key)" in text, text
    assert f"      0 {PLAIN_RELAY}  127.0.0.2  (not DNSSEC-validated)" in text, text
    assert f"dane: {PLAIN_RELAY}: no DANE: DANE is required, but {PLAIN_RELAY} " in text, text
    assert (f"not used (4.7.5): not connecting to {PLAIN_RELAY}[127.0.0.2]:2525: "
            f"DANE is required, but {PLAIN_RELAY} ") in text, text
    [host] = answer["resolved"]
    assert host["dnssec"] is False and host["dane"]["applies"] is False and host["dane"]["tlsa"] == []
    assert host["dane"]["note"].startswith(f"DANE is required, but {PLAIN_RELAY} "), host
    assert host["tls"]["deferred"]["dsn"] == "4.7.5" and host["tls"]["port"] == 2525, host


def test_resolve_relay_hosts_under_verify_show_the_names_to_match(tmp_path):
    """Each relay host's certificate must name that host (no next-hop domain for a relay host);
    an MX host's, the host or the recipient's domain."""
    rules = tmp_path / "destinations"
    rules.write_text("smtp:[relay.test]:2525%2C[192.0.2.9] tls=verify\n")  # as route writes the destination
    with DNSServer(ZONE) as dns:
        flags = ("--resolve", "--dns-servers", dns.servers, "--destinations", str(rules))
        relay = ("--relayhost", "[relay.test]:2525,[192.0.2.9]", "user@example.org")
        text, answer = route(*flags, *relay), route_json(*flags, *relay)
        mx = route_json(*flags, "--smtp-tls", "verify", "user@two.test")
    assert f"tls:       verify (from {rules}:1)" in text, text
    assert "tls: relay.test:2525: verify, the certificate must name relay.test" in text, text
    assert "tls: 192.0.2.9:25: verify, the certificate must name 192.0.2.9" in text, text
    assert [host["tls"] for host in answer["resolved"]] == [
        {"level": "verify", "port": 2525, "match": ["relay.test"]},
        {"level": "verify", "port": 25, "match": ["192.0.2.9"]}]
    assert (answer["tls"]["level"], answer["tls"]["source"]) == ("verify", f"{rules}:1")
    assert [host["tls"]["match"] for host in mx["resolved"]] == [["mx1.test", "two.test"], ["mx2.test", "two.test"]]
