"""The one reader of the config file and every policy file: lines, comments, encoding, and files
that are not files. Each file kind is read through its own loader, so the rules hold for all."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from policy.aliases import load_aliases
from policy.destinations import load_destinations
from policy.rewriting import RewritingError, load_rewriting
from policy.transport_map import PolicyError, load_definitions, load_transport_map
from router.config import ConfigError, read_file
from router.config.relay_auth import RelayAuthError, load_relay_auth
from tests.daemon import ROOT


def transports(path: str) -> list[tuple[str, str]]:
    return [(rule.destination, rule.next_hop.text) for rule in load_transport_map(path, {"x": "[192.0.2.9]"}).rules]


def definitions(path: str) -> list[tuple[str, str]]:
    return list(load_definitions(path).items())


def aliases(path: str) -> list[tuple[str, str]]:
    loaded = load_aliases(path, local_delivery=False)
    return [(virtual, loaded.lookup(virtual).user) for virtual in ("root", "a#b") if loaded.lookup(virtual)]


def rewriting(path: str) -> list[tuple[str, str]]:
    return [(rule.old, rule.new) for rule in load_rewriting(path).rules]


def relay_auth(path: str) -> list[tuple[str, str]]:
    return [(host, f"{user} {password}") for host, (user, password) in load_relay_auth(path).items()]


def destinations(path: str) -> list[tuple[str, str]]:
    return [(pattern, settings.describe()) for pattern, settings in load_destinations(path).rules]


def config(path: str) -> list[tuple[str, str]]:
    return [(name, value) for name, value in read_file(path).items()]


# kind: (loader, its error, a line with `{}` where a value goes, that value as loaded from `{}`)
KINDS: dict[str, tuple[Callable[[str], list[tuple[str, str]]], type[ValueError], str, Callable[[str], tuple]]] = {
    "transports": (transports, PolicyError, "{} queue/discard", lambda v: (v, "queue/discard")),
    "transport-defs": (definitions, PolicyError, "x {}", lambda v: ("x", v)),
    "aliases": (aliases, PolicyError, "{} nobody", lambda v: (v, "nobody")),
    "rewriting": (rewriting, RewritingError, "both {} new.example", lambda v: (v, "new.example")),
    "relay-auth": (relay_auth, RelayAuthError, "{} user pass", lambda v: (v, "user pass")),
    "destinations": (destinations, PolicyError, "{} concurrency=3",
                     lambda v: (v, "concurrency=3 recipients=50 mx-rollup=yes")),
    "config": (config, ConfigError, "me {}", lambda v: ("me", v)),
}
# a value each kind takes that holds `#` with no white space before it
HASH_VALUES = {"transports": "/a#b@x\\.example/", "transport-defs": "queue/error 5.1.1 ticket#12",
               "aliases": "a#b", "rewriting": "/a#b/", "relay-auth": "relay#1.example", "config": "mail#1.example",
               "destinations": "/a#b\\.example/"}
# a value in which a line-breaking character other than \n can stand
PLAIN_VALUES = {"transports": "a.example", "transport-defs": "[192.0.2.1]", "aliases": "root",
                "rewriting": "a.example", "relay-auth": "relay.example", "config": "mail.example",
                "destinations": "a.example"}
# a value holding `{}`, which loads with any character in it, for the kinds whose last field is
# the rest of the line (the others split fields at any white space, these characters included)
ODD_VALUES = {"transports": "/x{}y@a\\.example/", "transport-defs": "queue/error 5.1.1 x{}y", "config": "x{}y"}


def write(tmp_path: Path, kind: str, data: bytes | str) -> str:
    path = tmp_path / kind
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)
    return str(path)


def load(tmp_path: Path, kind: str, data: bytes | str) -> list[tuple[str, str]]:
    return KINDS[kind][0](write(tmp_path, kind, data))


def refused(tmp_path: Path, kind: str, data: bytes | str) -> str:
    loader, error, _, _ = KINDS[kind]
    path = write(tmp_path, kind, data)
    with pytest.raises(error) as caught:
        loader(path)
    return str(caught.value).replace(path, "FILE")


def line(kind: str, value: str) -> str:
    return KINDS[kind][2].format(value)


def loaded(kind: str, value: str) -> tuple:
    return KINDS[kind][3](value)


# -- comments --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("comment", ["  # a comment", "\t# a comment", " #", " ## x # y"])
def test_a_trailing_comment_is_allowed_in_every_file(tmp_path, kind, comment):
    value = PLAIN_VALUES[kind]
    assert load(tmp_path, kind, f"# a file\n  # indented\n{line(kind, value)}{comment}\n") == [loaded(kind, value)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_hash_without_white_space_before_it_is_kept(tmp_path, kind):
    value = HASH_VALUES[kind]
    assert load(tmp_path, kind, f"{line(kind, value)}  # but this goes\n") == [loaded(kind, value)]


def test_the_documented_aliases_example_loads(tmp_path):
    """The example in policy/aliases.py's docstring, with users this machine has."""
    path = tmp_path / "aliases"
    path.write_text("root        daemon\npostmaster  daemon\n"
                    '.*master    nobody       # a regex: any local part ending in "master"\n')
    entries = load_aliases(str(path), local_delivery=True)
    assert (entries.lookup("webmaster").user, entries.lookup("webmaster").where) == ("nobody", f"{path}:3")


def test_a_regex_can_match_a_hash_after_a_space_written_as_an_escape(tmp_path):
    path = write(tmp_path, "transports", "/a \\#b@x\\.example/ queue/discard # comment\n")
    assert load_transport_map(path, {}).lookup("a #b@x.example").where == f"{path}:1"


# -- line ends -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_crlf_line_ends_are_read(tmp_path, kind):
    value = PLAIN_VALUES[kind]
    assert load(tmp_path, kind, f"# a file\r\n\r\n{line(kind, value)} # c\r\n") == [loaded(kind, value)]
    assert re.match(r"^FILE:3: ", refused(tmp_path, kind, f"# a file\r\n{line(kind, value)}\r\n|bad|\r\n"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\x85"])
def test_only_newline_ends_a_line(tmp_path, kind, char):
    """str.splitlines() would break lines at these: a rule would be cut in two, and every error
    after it would name the wrong line."""
    value = ODD_VALUES.get(kind, PLAIN_VALUES[kind]).format(char)
    assert load(tmp_path, kind, f"# a{char}comment\n{line(kind, value)}\n") == [loaded(kind, value)]
    assert re.match(r"^FILE:3: ", refused(tmp_path, kind, f"# a{char}b\n{line(kind, value)}\n|bad|\n"))


# -- encoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_line_that_is_not_utf8_is_named(tmp_path, kind):
    value = PLAIN_VALUES[kind]
    data = f"# \u00fcber\n{line(kind, value)}\n# b".encode() + b"\xe4cker\n"
    assert refused(tmp_path, kind, data) == "FILE:3: not valid UTF-8"


# -- files that are not regular files, or too large --------------------------------------------

FIFO_SCRIPT = """
import sys
from policy.transport_map import PolicyError, load_transport_map
try:
    load_transport_map(sys.argv[1], {})
except PolicyError as exc:
    print(exc)
"""


def test_a_fifo_as_transports_file_is_refused_at_once(tmp_path):
    fifo = tmp_path / "transports"
    os.mkfifo(fifo)
    try:
        result = subprocess.run([sys.executable, "-c", FIFO_SCRIPT, str(fifo)], cwd=ROOT,
                                capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO hangs")
    assert result.stdout == f"{fifo}: cannot read: a FIFO, not a regular file\n", result.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_a_device_or_directory_is_refused(tmp_path, kind):
    loader, error, _, _ = KINDS[kind]
    with pytest.raises(error, match=r"^/dev/null: cannot read.*: a character device, not a regular file$"):
        loader("/dev/null")
    with pytest.raises(error, match=rf"^{re.escape(str(tmp_path))}: cannot read.*: a directory, not a regular file$"):
        loader(str(tmp_path))


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_over_the_size_limit_is_refused(tmp_path, kind):
    path = write(tmp_path, kind, f"{line(kind, PLAIN_VALUES[kind])}\n")
    os.truncate(path, 16 * 1024 * 1024 + 1)  # sparse: nothing is written
    with pytest.raises(KINDS[kind][1], match=rf"^{re.escape(path)}: cannot read.*: larger than 16 MB$"):
        KINDS[kind][0](path)


def test_a_file_at_the_size_limit_is_read(tmp_path):
    path = write(tmp_path, "transports", "a.example queue/discard\n")
    with open(path, "ab") as handle:
        handle.write(b"#" * (16 * 1024 * 1024 - os.path.getsize(path)))
    assert transports(path) == [("a.example", "queue/discard")]


def test_relay_auth_is_still_refused_when_others_may_read_it(tmp_path):
    path = write(tmp_path, "relay-auth", "relay.example user pass\n")
    os.chmod(path, 0o604)
    with pytest.raises(RelayAuthError, match=r"readable by group or others \(mode 0604\); make it 0600$"):
        load_relay_auth(path)


# -- the reader itself -------------------------------------------------------------------------


def test_the_reader_yields_numbered_lines_without_comments(tmp_path):
    from policy.policy_file import read_lines

    path = write(tmp_path, "any", b"# head\r\n\n  a b  \t# c\r\nd#e \\#f\n\t#\n\xc3\xbc\x0cx\n")
    assert list(read_lines(path, PolicyError)) == [(3, "a b"), (4, "d#e \\#f"), (6, "\u00fc\x0cx")]


def test_the_reader_names_what_it_reads_in_errors(tmp_path):
    from policy.policy_file import read_lines

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}/nope: cannot read config: No such file"):
        read_lines(str(tmp_path / "nope"), ConfigError, what="config")


def test_the_sample_files_load_with_their_comments():
    samples = ROOT / "packaging" / "config"
    defs = load_definitions(str(samples / "transport-defs"))
    assert defs["mailstore"] == "lmtp:/var/spool/mailstore/lmtp.sock"
    routes = load_transport_map(str(samples / "transports"), defs, str(samples / "transport-defs"))
    assert routes.lookup("postmaster@example.org").next_hop.text == "queue/maildir /var/mail/example.org/postmaster"
    assert load_aliases(str(samples / "aliases"), local_delivery=True).lookup("webmaster").user == "nobody"
    assert [rule.new for rule in load_rewriting(str(samples / "rewriting")).rules] == ["example.org", "example.org"]
    assert read_file(str(samples / "qrouter.conf"))["aliases"] == str(samples / "aliases")
