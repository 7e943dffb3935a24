"""The config table: file and flags, file:line errors, relative paths."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from policy.next_hop import MAILDIR, RETRY, SMTP, NextHopError, parse_next_hop
from router.config import KEYS, QPSMTPD_ME, ConfigError, choose_hostname, load
from tests.daemon import ROOT, qrouter


def write(tmp_path, text: str):
    path = tmp_path / "qrouter.conf"
    path.write_text(text)
    return path


def test_file_values_comments_and_relative_paths(tmp_path):
    path = write(tmp_path, "# qrouter\n\nqueue-dir spool   # the spool\nworkers 3\nmax-age 0.5\n"
                           "archive-failed on\ndefault-transport queue/maildir mail/%d/%u\n")
    config = load(str(path))
    assert config.queue_dir == str(tmp_path / "spool")
    assert (config.workers, config.max_age, config.archive_failed) == (3, 0.5, True)
    assert config.default_transport.kind == MAILDIR
    assert config.default_transport.argument == str(tmp_path / "mail/%d/%u")
    assert config.socket_path == str(tmp_path / "spool" / "status.sock")


def test_flags_win_over_the_file(tmp_path):
    path = write(tmp_path, "workers 3\n")
    assert load(str(path), {"workers": "7"}).workers == 7


@pytest.mark.parametrize(("text", "error"), [
    ("workers 0\n", "qrouter.conf:1: workers '0': must be at least 1"),
    ("\nworkers many\n", "qrouter.conf:2: workers 'many': is not a valid value"),
    ("max-age -1\n", "qrouter.conf:1: max-age '-1': must be a number from 0 to 1000000"),
    ("dns-timeout 1e300\n", "qrouter.conf:1: dns-timeout '1e300': must be a number from 0 to 1000000"),
    ("smtp-timeouts connect=1e300\n",
     "qrouter.conf:1: smtp-timeouts 'connect=1e300': must be a number from 0 to 1000000"),
    ("archive-failed maybe\n", "qrouter.conf:1: archive-failed 'maybe': must be yes or no"),
    ("colour blue\n", "qrouter.conf:1: unknown key 'colour'"),
    ("workers\n", "qrouter.conf:1: workers needs a value"),
    ("workers 1\nworkers 2\n", "qrouter.conf:2: workers already set at line 1"),
    ("default-transport queue/nonsense\n", "qrouter.conf:1: default-transport: unknown queue transport"),
    ("default-transport mx.example:99999\n", "qrouter.conf:1: default-transport: port 99999"),
    ("spool-group no-such-group-here\n", "qrouter.conf:1: spool-group: no such group"),
])
def test_errors_name_file_line_and_problem(tmp_path, text, error):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert error in str(caught.value)
    assert str(caught.value).startswith(str(path))


def test_flag_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"^--workers: workers '0': must be at least 1"):
        load(None, {"workers": "0"})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.conf: cannot read config: No such file"):
        load(str(tmp_path / "nope.conf"))


@pytest.mark.parametrize(("text", "kind", "argument"), [
    ("queue/retry", RETRY, "4.0.0"),
    ("queue/retry 4.2.2 mailbox full", RETRY, "4.2.2 mailbox full"),
    ("10.1.1.1:2525", SMTP, "10.1.1.1:2525"),
    ("[::1]:2425", SMTP, "[::1]:2425"),
    ("mx.foo.bar,mx.backup.foo.bar", SMTP, "mx.foo.bar,mx.backup.foo.bar"),
])
def test_next_hops(text, kind, argument):
    hop = parse_next_hop(text)
    assert (hop.kind, hop.argument) == (kind, argument)


@pytest.mark.parametrize(("text", "error"), [
    ("queue/error 4.1.1", "queue/error takes a 5.X.X status, not 4.1.1"),
    ("queue/maildir", "queue/maildir needs a directory"),
    ("|", "names no program"),
    ("host:0", "out of range"),
    ("bad host!", "is not a host"),
])
def test_bad_next_hops(text, error):
    with pytest.raises(NextHopError, match=error):
        parse_next_hop(text)


def test_readme_documents_every_key():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [key for key in KEYS if f"| `{key}` |" not in readme]
    assert missing == []


@pytest.mark.parametrize(("attempts", "seconds"), [
    (0, 300), (1, 300), (2, 600), (5, 4000), (1025, 4000), (10**9, 4000),
])
def test_backoff_doubles_up_to_the_maximum_at_any_attempt(attempts, seconds):
    # 2 ** 1024 does not fit a float: from attempt 1,025 on, a plain power raised OverflowError
    assert load(None, {"min-backoff": "300", "max-backoff": "4000"}).backoff(attempts) == seconds


@pytest.mark.parametrize(("low", "high", "seconds"), [
    ("0", "4000", 0),  # min-backoff 0 never waits
    ("5000", "4000", 5000),  # a minimum above the maximum wins
    ("600000", "1000000", 1000000),  # the largest value a duration may have
    ("0.000001", "1000000", 1000000),  # about 40 doublings to the cap
])
def test_backoff_at_the_edges(low, high, seconds):
    assert load(None, {"min-backoff": low, "max-backoff": high}).backoff(10**9) == seconds


@pytest.mark.parametrize("me, qpsmtpd_me, fqdn, hostname, chosen", [
    ("mx.example", "qp.example", "vm.example", "vm", ("mx.example", "the me setting")),
    ("", "qp.example", "vm.example", "vm", ("qp.example", QPSMTPD_ME)),
    ("", "", "vm.example", "vm", ("vm.example", "the FQDN")),
    ("", "", "localhost", "vm", ("vm", "the host name")),  # getfqdn() on a host known only to /etc/hosts
    ("", "", "LOCALHOST.localdomain", "vm", ("vm", "the host name")),
    ("", "", "127.0.1.1", "vm", ("vm", "the host name")),
    ("", "", "::1", "vm.example", ("vm.example", "the host name")),
    ("", "", "localhost", "", ("localhost", "the host name")),  # nothing better known
])
def test_the_host_name_is_never_localhost_when_anything_better_is_known(me, qpsmtpd_me, fqdn, hostname, chosen):
    assert choose_hostname(me, qpsmtpd_me, fqdn, hostname) == chosen


def test_check_config_names_the_ehlo_name_and_where_it_came_from(tmp_path):
    given = qrouter("check-config", "--config", str(write(tmp_path, "me mx.qrouter.test\n")))
    assert given.returncode == 0, given.stderr
    assert given.stdout.decode().splitlines()[-1] == "qrouter: EHLO name: mx.qrouter.test (from the me setting)"
    found = qrouter("check-config")
    assert found.returncode == 0, found.stderr
    try:
        qpsmtpd_me = Path(QPSMTPD_ME).read_text().split("\n")[0].strip()
    except OSError:
        qpsmtpd_me = ""
    name, source = choose_hostname("", qpsmtpd_me, socket.getfqdn(), socket.gethostname())
    assert found.stdout.decode().splitlines()[-1] == f"qrouter: EHLO name: {name} (from {source})"
    if socket.gethostname() not in ("localhost", ""):
        assert name != "localhost"


def test_check_config_names_every_bad_line_of_every_file(tmp_path):
    """One run names them all, as file:line, rather than one error per edit and rerun."""
    config = write(tmp_path, "workers two\nmax-age 1\nmax-age 2\n")
    result = qrouter("check-config", "--config", str(config))
    assert result.returncode == 78, result
    assert result.stderr.decode().splitlines() == [
        f"qrouter: {config}:1: workers 'two': is not a valid value",
        f"qrouter: {config}:3: max-age already set at line 2"], result.stderr
    transports = tmp_path / "transports"
    transports.write_text("a.example [127.0.0.1]:25\nb.example\n/unclosed queue/discard\nc.example nohop:x\n")
    destinations = tmp_path / "destinations"
    destinations.write_text("a.example concurrency=0\nb.example concurrency=2\nc.example colour=blue\n")
    rewriting = tmp_path / "rewriting"
    rewriting.write_text("to old.example\n")
    config = write(tmp_path, f"transports {transports}\ndestinations {destinations}\nrewriting {rewriting}\n")
    result = qrouter("check-config", "--config", str(config))
    assert result.returncode == 78, result
    named = [line.split(": ")[1] for line in result.stderr.decode().splitlines()]
    assert named == [f"{transports}:2", f"{transports}:3", f"{transports}:4", f"{destinations}:1",
                     f"{destinations}:3", f"{rewriting}:1"], result.stderr


def help_text(*command: str) -> str:
    """The help, on a terminal wide enough that no option name is folded."""
    result = subprocess.run([sys.executable, "-m", "router", *command, "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"}, cwd=ROOT, timeout=30)
    assert result.returncode == 0, result
    return result.stdout


def test_each_command_shows_the_options_it_uses_and_keys_lists_them_all():
    """--help of a view lists the keys it reads, not the daemon's 43; values say how they are
    written; options that mean nothing for a command are not offered; every key stays reachable."""
    for command in (["top"], ["status"], ["queue", "show"], ["queue", "flush"], ["queue", "list"]):
        text = help_text(*command)
        assert "--queue-dir" in text and "--workers" not in text and "--max-backoff" not in text, (command, text)
    run = help_text("run")
    assert all(f"--{key}" in run for key in KEYS), run
    assert "--workers" in run and " N " in run.split("--workers")[1].splitlines()[0]
    assert "yes|no" in run.split("--archive-failed")[1].splitlines()[0]
    assert "<str>" not in run
    assert "--yes" in help_text("queue", "delete") and "--all-deferred" in help_text("queue", "delete")
    assert "--yes" not in help_text("queue", "flush") and "--all-deferred" not in help_text("queue", "release")
    assert "waiting (incoming, active, deferred and hold)" in " ".join(help_text("queue", "list").split())
    listed = qrouter("keys", check=True).stdout.decode()
    assert [line.split()[0] for line in listed.splitlines() if not line.startswith(" ")] == list(KEYS)
    assert "smtp-timeouts STEP=SECONDS,...\n" in listed and "connect=30,greeting=300" in listed
