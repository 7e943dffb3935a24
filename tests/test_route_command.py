"""`qrouter route` with config flags and `--resolve` (DNS as delivery would see it), and
`qrouter status` with config flags."""

from __future__ import annotations

import json

import pytest
import typer

from router.admin.cli import app
from tests.daemon import qrouter
from tests.dns_server import DNSServer

ZONE = """
two           MX 20 mx2
              MX 10 mx1
mx1           A 127.0.0.2
              AAAA ::1
mx2           A 127.0.0.3
nullmx        MX 0 .
relay         A 127.0.0.7
"""

FAST = ("--dns-timeout", "2")


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
        out = route("--resolve", "--dns-servers", dns.servers, *FAST, "user@two.test")
        answer = route_json("--resolve", "--dns-servers", dns.servers, *FAST, "user@two.test")
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
        out = route("--resolve", "--dns-servers", dns.servers, *FAST, address)
        answer = route_json("--resolve", "--dns-servers", dns.servers, *FAST, address)
    assert said in out
    assert answer["error"]["dsn"] == dsn
    assert "resolved" not in answer


def test_resolve_temporary_failure():
    with DNSServer(ZONE) as dns:
        dns.servfail("two.test.")
        out = route("--resolve", "--dns-servers", dns.servers, *FAST, "user@two.test")
    assert "DNS lookup failed now (4.4.3): " in out


def test_resolve_relayhost_by_name():
    with DNSServer(ZONE) as dns:
        answer = route_json("--resolve", "--dns-servers", dns.servers, *FAST, "--relayhost", "[relay.test]:2525",
                            "user@example.org")
    assert answer["resolved"] == [{"host": "relay.test", "preference": 0, "addresses": ["127.0.0.7"]}]


def test_resolve_maildir_has_nothing_to_resolve(tmp_path):
    out = route("--resolve", "--default-transport", f"queue/maildir {tmp_path}/%d/%u", "user@example.org")
    assert "resolved:" in out and "no DNS" in out
