"""The transport policy: rule kinds, first-match precedence, variables, errors, `qrouter route`,
`qrouter check-config`, and a message split across three next hops by the real daemon."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from policy.next_hop import MAILDIR, MX, PIPE, SMTP
from policy.routing import load_policy
from policy.transport_map import PolicyError, load_definitions, load_transport_map
from router.config import load
from router.spool import Spool
from tests.daemon import message_in, qrouter, wait_for
from tests.smtp_servers import AioServer

DEFS = "splunkmta [10.9.9.9]:2525\nbackup mx.backup.foo.bar\n"
RULES = r"""
# destination            next hop
special@foo.bar          queue/maildir /var/mail/special
foo.bar                  mx.foo.bar:2525
*.foo                    [10.1.1.1]
/.*spl-[0-9]{6}\.foo\.bar/  $splunkmta
sub.example.foo          queue/discard
/^admin@.*/              queue/error 5.7.1 no admin mail
bücher.example      queue/retry
Other@Example.ORG        |/usr/bin/procmail -d x
example.org              queue/maildir mail/%u
*.example.org            $backup
"""


@pytest.fixture
def table(tmp_path):
    (tmp_path / "defs").write_text(DEFS)
    (tmp_path / "transports").write_text(RULES.replace("\\u00fc", "\u00fc"))
    return load_transport_map(str(tmp_path / "transports"), load_definitions(str(tmp_path / "defs")))


@pytest.mark.parametrize(("address", "line", "hop"), [
    ("special@foo.bar", 3, "queue/maildir /var/mail/special"),  # address rule before its domain's rule
    ("SPECIAL@FOO.BAR", 3, "queue/maildir /var/mail/special"),  # case-insensitive
    ("other@foo.bar", 4, "mx.foo.bar:2525"),
    ("x@a.foo", 5, "[10.1.1.1]"),
    ("x@deep.a.foo", 5, "[10.1.1.1]"),
    ("logs-spl-123456.foo.bar@foo.bar", 4, "mx.foo.bar:2525"),  # domain rule on line 4 wins over line 6
    ("x@host-spl-123456.foo.bar", 6, "[10.9.9.9]:2525"),  # the design's splunk example, via $splunkmta
    ("x@sub.example.foo", 5, "[10.1.1.1]"),  # the wildcard on line 5 comes first
    ("admin@anything.net", 8, "queue/error 5.7.1 no admin mail"),
    ("x@b\u00fccher.example", 9, "queue/retry"),
    ("x@xn--bcher-kva.example", 9, "queue/retry"),  # IDNA: A-label address, U-label rule
    ("other@example.org", 10, "|/usr/bin/procmail -d x"),
    ("someone@example.org", 11, "queue/maildir mail/%u"),
    ("x@www.example.org", 12, "mx.backup.foo.bar"),
])
def test_first_matching_rule_wins(table, tmp_path, address, line, hop):
    rule = table.lookup(address)
    assert rule is not None, address
    assert rule.where == f"{tmp_path / 'transports'}:{line}"
    assert rule.next_hop.text == hop


@pytest.mark.parametrize("address", ["x@foo", "x@bar.example", "x@notfoo.bar", "x@example.org.evil"])
def test_no_rule_matches(table, address):
    assert table.lookup(address) is None


def test_a_tab_parts_destination_and_next_hop_as_a_space_does(tmp_path):
    (tmp_path / "transports").write_text("foo.bar\tmx.foo.bar:2525\n*.foo.bar \t queue/error 5.7.1 no\tmail\n")
    table = load_transport_map(str(tmp_path / "transports"), {})
    assert table.lookup("x@foo.bar").next_hop.text == "mx.foo.bar:2525"
    assert table.lookup("x@a.foo.bar").next_hop.text == "queue/error 5.7.1 no\tmail"


def test_kinds_of_next_hops(table):
    assert table.lookup("x@foo.bar").next_hop.kind == SMTP
    assert table.lookup("other@example.org").next_hop.kind == PIPE
    assert table.lookup("x@example.org").next_hop.kind == MAILDIR


@pytest.mark.parametrize(("text", "error"), [
    ("foo.bar\n", ":1: rule for 'foo.bar' has no next hop"),
    ("\n\nfoo..bar smtp.example\n", ":3: bad destination: domain of 'foo..bar' is not a valid host name"),
    ("/a[b/ smtp.example\n", ":1: bad regex /a[b/: unterminated character set"),
    # a POSIX class, as a table written for Postfix may have: re would read it as a set of [, :, a, l, p, h
    ("/^[[:alpha:]]+\\.example$/ smtp.example\n", ":1: bad regex /^[[:alpha:]]+\\.example$/: possible nested set at "
     "position 2: a POSIX class such as [[:alpha:]] is not supported (write [a-z] or \\d)"),
    ("/^a[b--c]$/ smtp.example\n", ":1: bad regex /^a[b--c]$/: possible set difference at position 4: escape the "
     "doubled character if it is meant literally"),
    ("/abc smtp.example\n", ":1: regex destination '/abc' has no closing /"),
    ("foo.bar queue/nonsense\n", ":1: next hop 'queue/nonsense': unknown queue transport"),
    ("foo.bar host:70000\n", ":1: next hop 'host:70000': port 70000"),
    ("foo.bar $nothere\n", ":1: undefined variable $nothere in "),
    ("a b@foo.bar smtp.example\n", ":1: next hop 'b@foo.bar smtp.example': 'b@foo.bar smtp.example' is not a host"),
])
def test_errors_name_file_line_and_problem(tmp_path, text, error):
    (tmp_path / "defs").write_text(DEFS)
    (tmp_path / "transports").write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_transport_map(str(tmp_path / "transports"), load_definitions(str(tmp_path / "defs")),
                           str(tmp_path / "defs"))
    assert str(caught.value).startswith(str(tmp_path / "transports"))
    assert error in str(caught.value)


@pytest.mark.parametrize(("text", "error"), [
    ("x\n", ":1: variable x has no value"),
    ("9x value\n", ":1: '9x' is not a variable name"),
    ("x 1\nx 2\n", ":2: variable x is defined twice"),
])
def test_definition_errors(tmp_path, text, error):
    (tmp_path / "defs").write_text(text)
    with pytest.raises(PolicyError, match=error):
        load_definitions(str(tmp_path / "defs"))


def test_precedence_relayhost_transports_default_mx(tmp_path):
    (tmp_path / "transports").write_text("foo.bar queue/discard\n")
    base = {"transports": str(tmp_path / "transports"), "default-transport": "queue/retry"}
    policy = load_policy(load(None, base))
    assert policy.route("x@foo.bar").next_hop.text == "queue/discard"
    assert policy.route("x@other.example").reason == "default-transport"
    with_relay = load_policy(load(None, {**base, "relayhost": "mx.foo.bar,mx.backup.foo.bar"}))
    assert with_relay.route("x@foo.bar").next_hop.text == "mx.foo.bar,mx.backup.foo.bar"
    mx = load_policy(load(None, {"transports": str(tmp_path / "transports")})).route("x@Other.Example")
    assert (mx.next_hop.kind, mx.next_hop.argument) == (MX, "other.example")


def test_ten_thousand_rules_keep_first_match_order(tmp_path):
    lines = [f"d{i}.example queue/maildir /m/{i}" for i in range(10_000)]
    lines.insert(5_000, "/x@d9999\\.example/ queue/discard")
    (tmp_path / "transports").write_text("\n".join(lines) + "\n")
    table = load_transport_map(str(tmp_path / "transports"), {})
    assert table.lookup("x@d9999.example").next_hop.text == "queue/discard"
    assert table.lookup("y@d9999.example").next_hop.text == "queue/maildir /m/9999"
    assert table.lookup("x@d42.example").next_hop.text == "queue/maildir /m/42"


def test_route_command_explains_the_decision(tmp_path):
    (tmp_path / "defs").write_text(DEFS)
    (tmp_path / "transports").write_text(RULES)
    (tmp_path / "qrouter.conf").write_text("transports transports\ntransport-defs defs\n")
    result = qrouter("route", "--config", str(tmp_path / "qrouter.conf"), "x@host-spl-123456.foo.bar", check=True)
    assert result.stdout.decode().splitlines() == [
        "recipient: x@host-spl-123456.foo.bar",
        f"reason:    transports rule {tmp_path / 'transports'}:6 (/.*spl-[0-9]{{6}}\\.foo\\.bar/)",
        "method:    smtp",
        "next hop:  [10.9.9.9]:2525",
        "destination: smtp:[10.9.9.9]:2525",
        "destination settings: recipients=50 mx-rollup=yes (defaults: no destinations file)",
        "tls:       may (from the smtp-tls key)",
    ]
    answer = json.loads(qrouter("route", "--json", "--config", str(tmp_path / "qrouter.conf"),
                                "nobody@nowhere.example", check=True).stdout)
    assert answer == {"recipient": "nobody@nowhere.example", "rewritten": "nobody@nowhere.example",
                      "rewrite_rule": None, "sender": "", "rewritten_sender": "", "sender_rewrite_rule": None,
                      "reason": "no rule matched: MX routing", "rule": None, "alias": None,
                      "method": "mx", "next_hop": "MX routing for nowhere.example",
                      "destination": "mx:nowhere.example",
                      "destination_settings": {"concurrency": None, "initial_window": None, "recipients": 50,
                                               "messages_per_connection": None, "rate": None, "mx_rollup": True,
                                               "callout": None, "callout_rate": None, "source": "", "tls": None,
                                               "match": None, "fingerprint": None, "protocols": None},
                      "tls": {"level": "may", "match": [], "fingerprints": [], "min_protocol": "",
                              "source": "smtp-tls"}}
    bad = qrouter("route", "--config", str(tmp_path / "qrouter.conf"), "not an address")
    assert bad.returncode == 64 and b"not an address" in bad.stderr


def test_check_config_reports_the_first_error(tmp_path):
    (tmp_path / "transports").write_text("foo.bar queue/discard\n*.bar [::1]:99999\n")
    result = qrouter("check-config", "--transports", str(tmp_path / "transports"))
    assert result.returncode == 78
    assert f"{tmp_path / 'transports'}:2: next hop '[::1]:99999': port 99999".encode() in result.stderr
    (tmp_path / "transports").write_text("foo.bar queue/discard\n")
    assert qrouter("check-config", "--transports", str(tmp_path / "transports")).returncode == 0


def test_daemon_refuses_to_start_with_a_bad_policy(daemons, tmp_path):
    (tmp_path / "transports").write_text("foo.bar $undefined\n")
    daemon = daemons("--transports", str(tmp_path / "transports"), start=False)
    daemon.start(wait=False)
    assert daemon.process.wait(20) != 0
    assert f"cannot start: {tmp_path / 'transports'}:1: undefined variable $undefined" in daemon.log()


def test_one_message_split_across_three_next_hops(daemons, tmp_path):
    with AioServer(host="127.0.0.2") as one, AioServer(host="127.0.0.3") as two:
        (tmp_path / "transports").write_text(
            f"one.example [127.0.0.2]:{one.port}\n"
            f"*.two.example [127.0.0.3]:{two.port}\n"
            f"/.*@local\\.example/ queue/maildir {tmp_path}/mail/%u\n")
        daemon = daemons("--transports", str(tmp_path / "transports"), maildir=False)
        body = b"Subject: split\r\n\r\nthree ways\r\n"
        queue_id = Spool(daemon.spool).enqueue(
            "s@example.org", ["a@one.example", "b@x.two.example", "c@local.example", "d@one.example"], body)
        wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery to three next hops")
    assert [(m.rcpt_tos, m.content) for m in one.handler.messages] == [(["a@one.example", "d@one.example"], body)]
    assert [(m.rcpt_tos, m.content) for m in two.handler.messages] == [(["b@x.two.example"], body)]
    assert [message_in(p) for p in (tmp_path / "mail" / "c" / "new").iterdir()] == [body]


def test_reloaded_policy_reaches_deferred_mail(daemons, tmp_path):
    rules = tmp_path / "transports"
    rules.write_text("example.org queue/retry 4.4.1 not yet\n")
    config = tmp_path / "qrouter.conf"
    config.write_text(f"transports {rules}\nmin-backoff 60\n")
    daemon = daemons("--config", str(config))
    queue_id = Spool(daemon.spool).enqueue("s@example.org", ["u@example.org"], b"held\n")
    deferred = daemon.spool / "deferred" / queue_id
    wait_for(deferred.exists, what="deferral")
    rules.write_text("example.org $nothing\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.log(), what="refused reload")
    assert f"{rules}:1: undefined variable $nothing" in daemon.log()
    rules.write_text(f"example.org queue/maildir {daemon.mail}/%d/%u\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in daemon.log(), what="reload")
    daemon.wait_idle()  # the attempt reported: until then the supervisor goes by the worker's word, not the file
    os.utime(deferred, (time.time(), time.time()))
    delivered = wait_for(lambda: daemon.delivered("example.org/u"), what="delivery after reload")
    assert message_in(delivered[0]) == b"held\n"
