"""Hostile policy files and config values: every one is refused with the parser's own error,
naming FILE:LINE (or the flag) and the problem, never with an exception that would end a reload."""

from __future__ import annotations

import re

import pytest

from policy.rewriting import RewritingError, load_rewriting
from policy.routing import load_policy
from policy.transport_map import PolicyError, load_transport_map
from router.config import Config, ConfigError, load
from tests.daemon import qrouter

TOO_LARGE = "a repeat count or character code is too large"
TOO_DEEP = "nested too deeply"

# (regex, what the error says): each one makes re.compile raise something other than re.error
HOSTILE_REGEXES = [
    ("a{99999999999}", TOO_LARGE),  # OverflowError
    ("a{" + "9" * 5000 + "}", TOO_LARGE),  # ValueError: int() refuses over 4,300 digits
    ("[\\U99999999]", TOO_LARGE),  # OverflowError: no such character
    ("(" * 2000 + "a" + ")" * 2000, TOO_DEEP),  # RecursionError
    ("(?:" * 2000 + "a" + ")" * 2000, TOO_DEEP),
    ("(?a)(?u)", "ASCII and UNICODE flags are incompatible"),  # ValueError
]
IDS = ["huge-repeat", "repeat-of-5000-digits", "huge-character", "nested-groups", "nested-non-capturing",
       "clashing-flags"]

# (config key, file text with the regex on line 3)
FILES = {
    "transports": "foo.bar queue/discard\n# the hostile one\n/{regex}/ queue/discard\n",
    "aliases": "root daemon\n# the hostile one\n{regex} nobody\n",
    "rewriting": "from a.example b.example\n# the hostile one\nto /{regex}/ b.example\n",
    "destinations": "a.example rate=1/s\n# the hostile one\n/{regex}/ rate=1/s\n",
}


def policy_file(tmp_path, key: str, regex: str) -> str:
    path = tmp_path / key
    path.write_text(FILES[key].format(regex=regex))
    return str(path)


@pytest.mark.parametrize("key", FILES)
@pytest.mark.parametrize(("regex", "problem"), HOSTILE_REGEXES, ids=IDS)
def test_hostile_regex_is_refused_naming_file_and_line(tmp_path, key, regex, problem):
    path = policy_file(tmp_path, key, regex)
    with pytest.raises(PolicyError) as caught:
        load_policy(load(None, {key: path}))
    assert str(caught.value).startswith(f"{path}:3: bad regex ")
    assert str(caught.value).endswith(f": {problem}")


@pytest.mark.parametrize(("regex", "problem"), HOSTILE_REGEXES[::3], ids=IDS[::3])
def test_check_config_refuses_a_hostile_regex(tmp_path, regex, problem):
    path = policy_file(tmp_path, "transports", regex)
    result = qrouter("check-config", "--transports", path)
    assert result.returncode == 78, result.stderr
    assert f"{path}:3: bad regex ".encode() in result.stderr
    assert problem.encode() in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("hop", ["host:" + "9" * 5000, "lmtp:host:" + "9" * 5000, "[::1]:" + "0" * 5000])
def test_port_of_thousands_of_digits_is_out_of_range(tmp_path, hop):
    path = tmp_path / "transports"
    path.write_text(f"foo.bar queue/discard\nfoo.example {hop}\n")
    with pytest.raises(PolicyError, match=rf"^{re.escape(str(path))}:2: next hop .* is out of range \(1-65535\)$"):
        load_transport_map(str(path), {})


def test_relayhost_port_of_thousands_of_digits_names_the_flag():
    with pytest.raises(ConfigError, match=r"^--relayhost: relayhost: port 9+ in 'h:9+' is out of range"):
        load(None, {"relayhost": "h:" + "9" * 5000})


@pytest.mark.parametrize("key", ["transports", "aliases", "rewriting", "destinations", "queue-dir", "log"])
def test_config_value_with_a_nul_byte_is_refused_at_its_line(tmp_path, key):
    path = tmp_path / "qrouter.conf"
    path.write_text(f"workers 2\n{key} /etc/qrouter/\0policy\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:2: {key}: contains a NUL byte$"):
        load(str(path))


@pytest.mark.parametrize("key", ["transports", "transport_defs", "aliases", "rewriting", "destinations"])
def test_policy_path_with_a_nul_byte_is_a_policy_error(key):
    with pytest.raises(PolicyError, match=r"(?m)^/etc/\x00policy: cannot read.*: embedded null byte$"):
        load_policy(Config(**{key: "/etc/\0policy"}))  # (transport-defs alone is a second error)


def test_rewriting_path_with_a_nul_byte_is_a_rewriting_error():
    with pytest.raises(RewritingError, match=r"^/etc/\x00policy: cannot read rewriting rules: embedded null byte$"):
        load_rewriting("/etc/\0policy")
