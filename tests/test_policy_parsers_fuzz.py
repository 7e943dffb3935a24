"""Policy and config parsers on arbitrary input: they report errors (naming the file), never crash."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.aliases import load_aliases
from policy.rewriting import RewritingError, load_rewriting
from policy.transport_map import PolicyError, load_definitions, load_transport_map
from router.config import KEYS, ConfigError, parse_value, read_file

FRAGMENTS = st.sampled_from([
    "foo.bar", "*.foo", "/.*spl-[0-9]{6}/", "user@foo.bar", "$x", "$undefined", "queue/maildir /tmp/m",
    "queue/error 5.1.1 no", "[::1]:2425", "host:99999", "|/bin/cat", "/usr/bin/maildrop", "lmtp:/s",
    "root", "nobody", ".*master", "(", "[", "#", " ", "\t", "\n", "workers", "4", "max-age", "-1",
    "default-transport", "relayhost", "\u00fc", "\x00", "\r", "@", "/", "\\",
    # what makes re.compile or int() raise something other than their usual error
    "{99999999999}", "{" + "9" * 5000 + "}", "(" * 2000, "(?a)(?u)", "[\\U99999999]", "9" * 5000,
])
TEXT = st.one_of(st.text(max_size=300), st.lists(FRAGMENTS, max_size=40).map(" ".join),
                 st.lists(FRAGMENTS, max_size=40).map("".join))
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@contextmanager
def written(text: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="qrouter-fuzz-") as directory:
        path = Path(directory) / "policy"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        yield str(path)


PARSERS = {
    "transports": (lambda path: load_transport_map(path, {"x": "queue/discard"}), PolicyError),
    "transport-defs": (load_definitions, PolicyError),
    "aliases, local delivery": (lambda path: load_aliases(path, local_delivery=True), PolicyError),
    "aliases, no local delivery": (lambda path: load_aliases(path, local_delivery=False), PolicyError),
    "rewriting": (load_rewriting, RewritingError),
    "config": (read_file, ConfigError),
}


@pytest.mark.parametrize("name", PARSERS)
@SETTINGS
@given(text=TEXT)
def test_parser_reports_errors_naming_the_file(name, text):
    parser, error = PARSERS[name]
    with written(text) as path:
        try:
            parser(path)
        except error as exc:
            assert str(exc).startswith(path)


@settings(SETTINGS, max_examples=600)
@given(key=st.sampled_from(sorted(KEYS)), text=TEXT)
def test_every_config_value_is_parsed_or_refused_naming_where(tmp_path, key, text):
    try:
        parse_value(key, text, "--flag", str(tmp_path))
    except ConfigError as exc:
        assert str(exc).startswith("--flag: ")


def nested(depth: int, opener: str) -> str:
    """A regex of `depth` groups one inside the other: re's parser recurses into every group."""
    return opener * depth + "a" + ")" * depth


# repeat counts around re's limit (2**32 - 1) and past int()'s 4,300 digits
COUNTS = st.one_of(st.integers(0, 2**40).map(str), st.integers(4000, 6000).map(lambda n: "9" * n))
HOSTILE_REGEXES = st.one_of(
    COUNTS.map(lambda n: f"a{{{n}}}"), COUNTS.map(lambda n: f"a{{1,{n}}}"),
    st.builds(nested, st.integers(0, 3000), st.sampled_from(["(", "(?:", "(?>", "(?=", "(?:a|"])),
    st.sampled_from(["(?a)(?u)", "[\\U99999999]", "\\U99999999", "a{2,1}"]),
)
REGEX_PARSERS = {
    "transports": ("/{}/ queue/discard", PARSERS["transports"]),
    "aliases": ("{} nobody", PARSERS["aliases, no local delivery"]),
    "rewriting": ("to /{}/ b.example", PARSERS["rewriting"]),
}


@pytest.mark.parametrize("name", REGEX_PARSERS)
@SETTINGS
@given(regex=HOSTILE_REGEXES, comments=st.integers(0, 3))
def test_any_regex_loads_or_is_refused_at_its_line(name, regex, comments):
    line, (parser, error) = REGEX_PARSERS[name]
    with written("# comment\n" * comments + line.format(regex) + "\n") as path:
        try:
            parser(path)
        except error as exc:
            assert str(exc).startswith(f"{path}:{comments + 1}: bad regex "), str(exc)[:200]
