"""The destinations file: settings per destination, matched by domain, wildcard, regex, site or
next hop, the first matching line winning; every bad line refused with FILE:LINE, by the loader,
by `qrouter check-config`, at start and on reload; `qrouter route` shows what applies."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from policy.destinations import DEFAULTS, DestinationSettings, load_destinations
from policy.routing import load_policy
from policy.transport_map import PolicyError
from router.config import load
from router.spool import Spool
from tests.daemon import ROOT, message_in, qrouter, wait_for

KNOWN = ("known: concurrency, initial-window, recipients, messages-per-connection, rate, mx-rollup, callout, "
         "callout-rate, tls, match, fingerprint, protocols")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "destinations"
    path.write_text(text)
    return str(path)


def rules(tmp_path: Path, text: str):
    return load_destinations(write(tmp_path, text))


def refused(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load_destinations(path)
    return str(caught.value).replace(path, "FILE")


# -- keys --------------------------------------------------------------------------------------


def test_every_key_is_read(tmp_path):
    loaded = rules(tmp_path, "example.com concurrency=8 initial-window=3 recipients=20 "
                             "messages-per-connection=100 rate=10/min mx-rollup=no callout=yes callout-rate=2/min\n")
    assert loaded.settings("example.com", None, "mx:example.com") == DestinationSettings(
        concurrency=8, initial_window=3, recipients=20, messages_per_connection=100, rate=10 / 60,
        mx_rollup=False, callout=True, callout_rate=2 / 60, source=f"{tmp_path}/destinations:1")


def test_keys_a_line_leaves_out_have_their_defaults(tmp_path):
    settings = rules(tmp_path, "example.com rate=2/s\n").settings("example.com", None, "mx:example.com")
    assert (settings.concurrency, settings.initial_window, settings.recipients, settings.messages_per_connection,
            settings.rate, settings.mx_rollup, settings.callout, settings.callout_rate) == (
        None, None, 50, None, 2.0, True, None, None)
    assert DEFAULTS == DestinationSettings(concurrency=None, initial_window=None, recipients=50,
                                           messages_per_connection=None, rate=None, mx_rollup=True, source="")


@pytest.mark.parametrize(("text", "per_second", "shown"), [
    ("5/s", 5.0, "5/s"), ("0.5/s", 0.5, "30/min"), ("10/min", 10 / 60, "10/min"), ("90/min", 1.5, "1.5/s"),
    ("36/h", 0.01, "36/h"), (".5/h", 0.5 / 3600, "0.5/h"), ("1/h", 1 / 3600, "1/h"), ("7/min", 7 / 60, "7/min"),
    ("1000000/s", 1e6, "1000000/s"),
])
def test_rates_are_messages_per_second(tmp_path, text, per_second, shown):
    settings = rules(tmp_path, f"example.com rate={text}\n").settings("example.com", None, "")
    assert settings.rate == pytest.approx(per_second)
    assert f"rate={shown} " in settings.describe() + " "


@pytest.mark.parametrize(("word", "value"), [("yes", True), ("No", False), ("on", True), ("OFF", False),
                                             ("1", True), ("0", False), ("true", True), ("false", False)])
def test_mx_rollup_takes_the_words_the_config_takes(tmp_path, word, value):
    assert rules(tmp_path, f"example.com mx-rollup={word}\n").settings("example.com", None, "").mx_rollup is value
    assert load(None, {"rewrite-both": word}).rewrite_both is value


def test_initial_window_may_equal_concurrency_or_come_alone(tmp_path):
    loaded = rules(tmp_path, "a.example concurrency=4 initial-window=4\nb.example initial-window=40\n")
    assert loaded.settings("a.example", None, "").initial_window == 4
    assert loaded.settings("b.example", None, "").initial_window == 40


# -- patterns and first match ----------------------------------------------------------------

FILE = """\
# pattern                        settings
smtp:[127.0.0.1]:2525            concurrency=1
Example.COM                      concurrency=2
*.example.net                    concurrency=3
/.*\\.outlook\\.com/               concurrency=4   # a regex on the domain
mx2.example.org,MX1.example.org  concurrency=5   # a site, its hosts in any order
mx.single.example                concurrency=6   # a domain, or a site of one MX host
LMTP:/run/dovecot/lmtp           concurrency=7
example.net                      concurrency=8
sub.example.net                  concurrency=9   # never: *.example.net comes first
"""


@pytest.mark.parametrize(("domain", "site", "next_hop", "line"), [
    ("example.com", None, "mx:example.com", 3),
    ("EXAMPLE.com.", None, "mx:example.com", 3),  # case and a final dot do not matter
    ("a.example.net", None, "mx:a.example.net", 4),
    ("deep.a.example.net", None, "mx:deep.a.example.net", 4),
    ("sub.example.net", None, "mx:sub.example.net", 4),
    ("example.net", None, "mx:example.net", 9),  # *.example.net is not example.net itself
    ("eu.outlook.com", None, "mx:eu.outlook.com", 5),
    ("other.example", "mx1.example.org,mx2.example.org", "mx:other.example", 6),
    ("other.example", "MX2.example.org.,mx1.example.org", "mx:other.example", 6),
    ("other.example", "mx.single.example", "mx:other.example", 7),
    ("mx.single.example", None, "mx:mx.single.example", 7),
    (None, None, "lmtp:/run/dovecot/lmtp", 8),
    ("other.example", None, "smtp:[127.0.0.1]:2525", 2),
    ("example.com", None, "SMTP:[127.0.0.1]:2525", 2),  # the next hop's line comes before the domain's
    ("eu.outlook.com", "mx1.example.org,mx2.example.org", "mx:eu.outlook.com", 5),  # the regex's line first
])
def test_the_first_line_that_matches_domain_site_or_next_hop_wins(tmp_path, domain, site, next_hop, line):
    settings = rules(tmp_path, FILE).settings(domain, site, next_hop)
    assert settings.source == f"{tmp_path}/destinations:{line}"
    assert settings.concurrency == line - 1


@pytest.mark.parametrize(("domain", "site", "next_hop"), [
    ("other.example", None, "mx:other.example"),
    ("example.com.evil", None, "mx:example.com.evil"),
    ("outlook.com", None, "mx:outlook.com"),  # the regex wants a dot before outlook.com
    ("outlook.com.evil", None, "mx:outlook.com.evil"),  # and all of the domain
    ("other.example", "mx1.example.org", "mx:other.example"),  # a site is all its hosts
    ("other.example", "mx1.example.org,mx2.example.org,mx3.example.org", "mx:other.example"),
    ("other.example", None, "smtp:[127.0.0.1]:25"),  # a next hop is matched exactly
    ("other.example", None, "smtp:127.0.0.1:2525"),
    (None, "a.example.net", "lmtp:/run/dovecot/lmtp2"),  # wildcards and regexes are for domains only
    (None, "eu.outlook.com", "lmtp:/run/dovecot/lmtp2"),
])
def test_nothing_else_matches(tmp_path, domain, site, next_hop):
    assert rules(tmp_path, FILE).settings(domain, site, next_hop) == DEFAULTS


def test_a_regex_is_tried_on_the_domain_not_the_address(tmp_path):
    loaded = rules(tmp_path, "/user@.*/ concurrency=1\n/b[.]example/ concurrency=2\n")
    assert loaded.settings("b.example", None, "mx:b.example").concurrency == 2
    assert loaded.settings("B.EXAMPLE", None, "mx:b.example").concurrency == 2


def test_an_idn_domain_matches_in_either_form(tmp_path):
    loaded = rules(tmp_path, "bücher.example concurrency=2\n/xn--.*/ concurrency=3\n")
    assert loaded.settings("xn--bcher-kva.example", None, "").concurrency == 2
    assert loaded.settings("BÜCHER.example", None, "").concurrency == 2
    assert loaded.settings("café.example", None, "").concurrency == 3


def test_without_a_file_every_lookup_gives_the_defaults():
    policy = load_policy(load(None, {}))
    assert policy.destinations.settings("example.com", "mx.example.com", "mx:example.com") == DEFAULTS


def test_the_policy_carries_the_file_the_config_names(tmp_path):
    path = write(tmp_path, "example.com concurrency=5\n")
    policy = load_policy(load(None, {"destinations": path}))
    assert policy.destinations.settings("example.com", None, "mx:example.com").source == f"{path}:1"


def test_lookups_remembered_never_outlive_the_file_they_were_found_in(tmp_path):
    """As a reload does: a new file is loaded while the old rules have answered the same lookup."""
    first = rules(tmp_path, "example.com concurrency=5\n")
    assert first.settings("example.com", None, "mx:example.com").concurrency == 5
    second = rules(tmp_path, "example.com concurrency=6\n")
    assert second.settings("example.com", None, "mx:example.com").concurrency == 6
    assert first.settings("example.com", None, "mx:example.com").concurrency == 5


# -- comments, the one rule of every policy file ---------------------------------------------


def test_comments_are_those_of_every_policy_file(tmp_path):
    loaded = rules(tmp_path, "# head\r\n  # indented\n\nexample.com\tconcurrency=5 # the rest goes\r\n"
                             "/a#b\\.example/ concurrency=6 #\n/a \\#c\\.example/ concurrency=7\n")
    assert [pattern for pattern, _ in loaded.rules] == ["example.com", "/a#b\\.example/", "/a \\#c\\.example/"]
    assert loaded.settings("example.com", None, "").source.endswith(":4")
    assert loaded.settings("a#b.example", None, "").concurrency == 6  # a # after no white space is kept
    assert loaded.settings("a #c.example", None, "").concurrency == 7


def test_a_hash_after_white_space_cuts_the_settings(tmp_path):
    """`rate=1/s #concurrency=9`: all after the # is a comment, even without a space after it."""
    settings = rules(tmp_path, "example.com rate=1/s #concurrency=9\n").settings("example.com", None, "")
    assert (settings.rate, settings.concurrency) == (1.0, None)


# -- bad lines -------------------------------------------------------------------------------

COUNT = "must be a whole number from 1 to 1000000"
RATE = "must be N/s, N/min or N/h with N a number above 0 (e.g. 10/min), at most 1000000/s"


@pytest.mark.parametrize("key", ["concurrency", "initial-window", "recipients", "messages-per-connection"])
@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", "+5", "1_0", "\u0663", "1000001", "9" * 5000, "5x"])
def test_bad_counts_are_refused(tmp_path, key, value):
    assert refused(tmp_path, f"# c\n\nexample.com {key}={value}\n") == f"FILE:3: {key} {value!r}: {COUNT}"


@pytest.mark.parametrize("value", ["0/s", "0.0/min", "10", "10/day", "10/m", "-1/s", "inf/s", "nan/s", "1e3/s",
                                   "1000001/s", "/s", "1./s", "9" * 400 + "/s"])
def test_bad_rates_are_refused(tmp_path, value):
    assert refused(tmp_path, f"example.com rate={value}\n") == f"FILE:1: rate {value!r}: {RATE}"


@pytest.mark.parametrize("value", ["maybe", "y", "2"])
def test_bad_mx_rollup_is_refused(tmp_path, value):
    assert refused(tmp_path, f"example.com mx-rollup={value}\n") == (
        f"FILE:1: mx-rollup {value!r}: must be yes or no (also 1/0, true/false, on/off)")


@pytest.mark.parametrize(("text", "error"), [
    ("example.com colour=blue\n", f"FILE:1: unknown key 'colour' ({KNOWN})"),
    ("example.com Concurrency=5\n", f"FILE:1: unknown key 'Concurrency' ({KNOWN})"),
    ("example.com concurrency 5\n", "FILE:1: 'concurrency' is not key=value"),
    ("example.com concurrency=\n", "FILE:1: concurrency needs a value"),
    ("example.com =5\n", f"FILE:1: unknown key '' ({KNOWN})"),
    ("example.com rate=1/s rate=2/s\n", "FILE:1: rate is given twice"),
    ("example.com concurrency=2 initial-window=3\n", "FILE:1: initial-window 3 is more than concurrency 2"),
    ("example.com initial-window=3 concurrency=2\n", "FILE:1: initial-window 3 is more than concurrency 2"),
    ("a.example rate=1/s\nexample.com\n", "FILE:2: rule for 'example.com' has no settings (key=value ...)"),
    ("example.com   # concurrency=5\n", "FILE:1: rule for 'example.com' has no settings (key=value ...)"),
    ("u@example.com rate=1/s\n",
     "FILE:1: 'u@example.com': the destinations file takes domains, sites and next hops, not addresses"),
    ("exa_mple..com rate=1/s\n", "FILE:1: bad destination: domain of 'exa_mple..com' is not a valid host name"),
    ("*.exa..mple rate=1/s\n", "FILE:1: bad destination: domain of '*.exa..mple' is not a valid host name"),
    ("/a[b/ rate=1/s\n", "FILE:1: bad regex /a[b/: unterminated character set at position 1"),
    ("/abc rate=1/s\n", "FILE:1: regex destination '/abc' has no closing /"),
    ("mx1.example.org,,mx2.example.org rate=1/s\n",
     "FILE:1: site 'mx1.example.org,,mx2.example.org': '' is not a host name (a site is MX host names joined "
     "by commas)"),
    ("mx1.example.org,*.example.org rate=1/s\n",
     "FILE:1: site 'mx1.example.org,*.example.org': '*.example.org' is not a host name (a site is MX host names "
     "joined by commas)"),
    ("mx1.example.org,mx..example.org rate=1/s\n",
     "FILE:1: bad destination: domain of 'mx..example.org' is not a valid host name"),
    ("smpt:[127.0.0.1]:25 rate=1/s\n",
     "FILE:1: next hop 'smpt:[127.0.0.1]:25': 'smpt' is no kind of next hop; write a next hop as `qrouter route` "
     "shows its destination, KIND:ARGUMENT with KIND one of smtp, lmtp, mx, pipe, mda, maildir, discard, error, "
     "retry, queue/NAME"),
])
def test_bad_lines_are_refused_with_file_line_and_problem(tmp_path, text, error):
    assert refused(tmp_path, text) == error


def test_every_next_hop_kind_is_a_pattern(tmp_path):
    kinds = ["smtp", "lmtp", "mx", "pipe", "mda", "maildir", "discard", "error", "retry", "queue/router"]
    loaded = rules(tmp_path, "".join(f"{kind}:x concurrency={n}\n" for n, kind in enumerate(kinds, 1)))
    assert [loaded.settings(None, None, f"{kind}:x").concurrency for kind in kinds] == list(range(1, 11))


def test_a_missing_file_is_named_with_the_key(tmp_path):
    with pytest.raises(PolicyError, match=rf"^{re.escape(str(tmp_path))}/nope: cannot read destinations: No such file"):
        load_policy(load(None, {"destinations": str(tmp_path / "nope")}))


def test_the_sample_file_loads_as_its_comments_say():
    loaded = load_destinations(str(ROOT / "packaging" / "config" / "destinations"))
    partner = loaded.settings("example.net", None, "mx:example.net")
    assert partner.describe() == "concurrency=5 recipients=50 rate=10/min mx-rollup=yes"
    assert loaded.settings("x.example", "mx2.example.com,mx1.example.com", "mx:x.example").recipients == 100
    assert loaded.settings(None, None, "smtp:[192.0.2.25]:25").initial_window == 10


# -- the commands and the daemon -------------------------------------------------------------


def test_check_config_refuses_a_bad_line_and_passes_a_good_file(tmp_path):
    path = write(tmp_path, "# partners\nexample.com concurrency=5\nexample.net rate=10/fortnight\n")
    config = tmp_path / "qrouter.conf"
    config.write_text(f"destinations {path}\n")
    result = qrouter("check-config", "--config", str(config))
    assert result.returncode == 78, result.stderr
    assert result.stderr.decode() == (
        f"qrouter: {path}:3: rate '10/fortnight': must be N/s, N/min or N/h with N a number above 0 "
        "(e.g. 10/min), at most 1000000/s\n")
    write(tmp_path, "# partners\nexample.com concurrency=5\nexample.net rate=10/min\n")
    result = qrouter("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert b"and its policy files are valid" in result.stdout


def test_check_config_names_a_missing_file_and_its_key(tmp_path):
    result = qrouter("check-config", "--destinations", str(tmp_path / "nope"))
    assert result.returncode == 78, result.stderr
    assert f"qrouter: {tmp_path}/nope: cannot read destinations: No such file".encode() in result.stderr


def test_route_shows_the_settings_and_their_line(tmp_path):
    path = write(tmp_path, "smtp:[192.0.2.7]:2525 concurrency=9\n# the partner\nexample.com concurrency=5 "
                           "rate=10/min\n")
    out = qrouter("route", "--destinations", path, "user@Example.com", check=True).stdout.decode()
    assert "destination: mx:example.com\n" in out
    assert (f"destination settings: concurrency=5 recipients=50 rate=10/min mx-rollup=yes (from {path}:3)\n"
            in out)
    out = qrouter("route", "--destinations", path, "--relayhost", "[192.0.2.7]:2525", "user@example.com",
                  check=True).stdout.decode()
    assert "destination: smtp:[192.0.2.7]:2525\n" in out
    assert f"destination settings: concurrency=9 recipients=50 mx-rollup=yes (from {path}:1)\n" in out
    out = qrouter("route", "--destinations", path, "user@example.org", check=True).stdout.decode()
    assert f"destination settings: recipients=50 mx-rollup=yes (defaults: no rule in {path} matches)\n" in out
    out = qrouter("route", "user@example.org", check=True).stdout.decode()
    assert "destination settings: recipients=50 mx-rollup=yes (defaults: no destinations file)\n" in out


def test_route_json_has_the_settings(tmp_path):
    path = write(tmp_path, "*.example.com messages-per-connection=10 rate=2/s mx-rollup=no\n")
    answer = json.loads(qrouter("route", "--json", "--destinations", path, "u@a.example.com", check=True).stdout)
    assert answer["destination"] == "mx:a.example.com"
    assert answer["destination_settings"] == {
        "concurrency": None, "initial_window": None, "recipients": 50, "messages_per_connection": 10,
        "rate": 2.0, "mx_rollup": False, "callout": None, "callout_rate": None, "source": f"{path}:1", "tls": None,
        "match": None, "fingerprint": None, "protocols": None}


def test_route_refuses_a_bad_file(tmp_path):
    path = write(tmp_path, "example.com concurrency=many\n")
    result = qrouter("route", "--destinations", path, "user@example.com")
    assert result.returncode == 78
    assert f"qrouter: {path}:1: concurrency 'many': {COUNT}".encode() in result.stderr


def test_the_daemon_does_not_start_with_a_bad_file(tmp_path):
    path = write(tmp_path, "example.com concurrency=5 initial-window=6\n")
    result = qrouter("run", "--foreground", "--queue-dir", str(tmp_path / "spool"), "--destinations", path,
                     "--default-transport", "queue/discard", "--log", "stderr", timeout=60)
    assert result.returncode == 1
    assert f"cannot start: {path}:1: initial-window 6 is more than concurrency 5".encode() in result.stderr


def test_reload_refuses_a_bad_file_and_keeps_running(daemons, tmp_path):
    path = write(tmp_path, "example.org concurrency=5\n")
    daemon = daemons("--destinations", path)
    spool = Spool(daemon.spool)
    workers = sorted(daemon.worker_pids())

    write(tmp_path, "example.org concurrency=5\n# now a typo\nexample.net concurency=5\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.log(), what="the reload refused")
    refusal = next(line for line in daemon.log().splitlines() if "reload refused" in line)
    assert refusal.endswith(f"reload refused, keeping the running config and policy: {path}:3: unknown key "
                            f"'concurency' ({KNOWN})")
    assert daemon.process.poll() is None
    assert sorted(daemon.worker_pids()) == workers
    spool.enqueue("a@example.org", ["u@example.org"], b"after the refusal\n")
    delivered = wait_for(lambda: daemon.delivered("example.org/u"), what="delivery after the refused reload")
    assert message_in(delivered[0]) == b"after the refusal\n"

    write(tmp_path, "example.org concurrency=5\nexample.net concurrency=5\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in daemon.log(), what="the reload of the fixed file")
    assert daemon.log().count("reload refused") == 1
    assert daemon.process.poll() is None
