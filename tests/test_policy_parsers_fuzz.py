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
from policy.transport_map import PolicyError, load_definitions, load_transport_map
from router.config import ConfigError, read_file

FRAGMENTS = st.sampled_from([
    "foo.bar", "*.foo", "/.*spl-[0-9]{6}/", "user@foo.bar", "$x", "$undefined", "queue/maildir /tmp/m",
    "queue/error 5.1.1 no", "[::1]:2425", "host:99999", "|/bin/cat", "/usr/bin/maildrop", "lmtp:/s",
    "root", "nobody", ".*master", "(", "[", "#", " ", "\t", "\n", "workers", "4", "max-age", "-1",
    "default-transport", "relayhost", "\u00fc", "\x00", "\r", "@", "/", "\\",
])
TEXT = st.one_of(st.text(max_size=300), st.lists(FRAGMENTS, max_size=40).map(" ".join),
                 st.lists(FRAGMENTS, max_size=40).map("".join))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


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
