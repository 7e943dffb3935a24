"""Transport plugins: the example package in tests/plugin_example is installed into this
environment with pip, registers `queue/upper` in the entry point group qrouter.transports, and the
real daemon routes mail through it; its argument check runs when the policy loads; mail for a
transport that is gone is deferred. The built-ins come from the same group.

The package is uninstalled when the module is done, so the other tests see the environment as
it was."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from policy import transport_registry
from policy.next_hop import DISCARD, ERROR, MAILDIR, RETRY, NextHop, parse_next_hop
from router.config import Config
from router.spool import Spool
from router.spool.queue_file import Recipient
from tests.daemon import DAEMON_USER, qrouter, wait_for
from workers.maildir import MaildirTransport
from workers.transport import Unavailable
from workers.verdict import VerdictTransport
from workers.worker import build_transports

EXAMPLE = Path(__file__).resolve().parent / "plugin_example"
DISTRIBUTION = "qrouter-upper"


def _pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
                            capture_output=True, timeout=180)
    assert result.returncode == 0, f"pip {' '.join(args)}: {result.stderr.decode()}"


def _builds_without_network() -> bool:
    """setuptools builds a wheel by itself from 70.1 on; an older one needs the wheel package."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    numbers = re.match(r"(\d+)\.(\d+)", version)
    recent = numbers is not None and (int(numbers[1]), int(numbers[2])) >= (70, 1)
    return recent or importlib.util.find_spec("wheel") is not None


class Plugin:
    """The example package, installed or not."""

    def __init__(self, source: Path):
        self.source = source  # a copy: building writes build/ and *.egg-info beside the sources
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            offline = ["--no-build-isolation", "--no-index"] if _builds_without_network() else []
            _pip("install", "--no-deps", *offline, str(self.source))
            self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            _pip("uninstall", "--yes", DISTRIBUTION)
            self.installed = False


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    source = tmp_path_factory.mktemp("plugin") / "plugin_example"
    shutil.copytree(EXAMPLE, source)
    example = Plugin(source)
    try:
        yield example
    finally:
        example.uninstall()
        sys.modules.pop("qrouter_upper", None)


@pytest.fixture
def upper(plugin):
    plugin.install()
    return plugin


def test_built_ins_come_from_the_entry_point_group():
    points = transport_registry.installed()
    assert {name: points[name].value for name in (MAILDIR, DISCARD, ERROR, RETRY)} == {
        MAILDIR: "workers.maildir:MaildirTransport", DISCARD: "workers.verdict:VerdictTransport",
        ERROR: "workers.verdict:VerdictTransport", RETRY: "workers.verdict:VerdictTransport"}
    transports = build_transports(Config())
    assert isinstance(transports[MAILDIR], MaildirTransport)
    assert all(isinstance(transports[kind], VerdictTransport) for kind in (DISCARD, ERROR, RETRY))


def test_a_transport_not_installed_defers_and_is_not_kept():
    transports = build_transports(Config())
    hop = NextHop("queue/ghost", "x", "queue/ghost x")
    outcomes = transports[hop.kind].deliver(None, [Recipient("a@x.example"), Recipient("b@x.example")], hop)
    assert [(o.status, o.dsn, o.reply) for o in outcomes] == [
        ("deferred", "4.3.0", "transport queue/ghost is not installed")] * 2
    assert hop.kind not in transports
    with pytest.raises(KeyError):
        transports["no-such-kind"]  # not a queue transport: a programming error, as before


def test_mail_routed_through_the_plugin(upper, daemons, tmp_path):
    out = tmp_path / "upper"
    out.mkdir()
    shutil.chown(out, DAEMON_USER)  # the plugin writes as the daemon's user
    (tmp_path / "transports").write_text(f"x.example queue/upper {out}\n")
    (tmp_path / "qrouter.conf").write_text(f"transports {tmp_path / 'transports'}\n")
    route = qrouter("route", "--config", str(tmp_path / "qrouter.conf"), "u@x.example", check=True)
    assert b"method:    queue/upper" in route.stdout
    assert qrouter("check-config", "--config", str(tmp_path / "qrouter.conf")).returncode == 0
    daemon = daemons("--transports", str(tmp_path / "transports"), maildir=False)
    queue_id = Spool(daemon.spool).enqueue("s@example.org", ["u@x.example", "v@x.example"],
                                           b"Subject: shout\r\n\r\nhello, plugin\r\n")
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery through queue/upper")
    assert [path.read_bytes() for path in out.iterdir()] == [b"HELLO, PLUGIN\r\n"]
    for address in ("u@x.example", "v@x.example"):
        assert f"{queue_id}: to=<{address}>, relay=upper[{out}]," in daemon.log()
    assert daemon.log().count("dsn=2.0.0, status=sent (written as ") == 2


@pytest.mark.parametrize(("rules", "error"), [
    ("ok.example queue/upper /tmp\nbad.example queue/upper relative/dir\n",
     ":2: next hop 'queue/upper relative/dir': queue/upper: needs an absolute directory, not 'relative/dir'"),
    ("foo.example queue/nonsense\n",
     ":1: next hop 'queue/nonsense': unknown queue transport 'queue/nonsense' (known: queue/maildir, "
     "queue/discard, queue/error, queue/retry, queue/qpsmtpd, queue/router, queue/upper)"),
], ids=["plugin-check", "unknown"])
def test_check_config_refuses(upper, tmp_path, rules, error):
    (tmp_path / "transports").write_text(rules)
    result = qrouter("check-config", "--transports", str(tmp_path / "transports"))
    assert result.returncode == 78
    assert f"{tmp_path / 'transports'}{error}".encode() in result.stderr


def test_one_instance_a_worker_whatever_the_threads(upper):
    transports = build_transports(Config())
    kind = parse_next_hop("queue/upper /tmp").kind
    assert kind == "queue/upper"
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(transports[kind])) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(transport) for transport in got}) == 1 and transports[kind] is got[0]
    assert type(got[0]).__module__ == "qrouter_upper" and got[0] in transports.values()


def test_mail_for_a_plugin_uninstalled_since_the_policy_loaded_is_deferred(upper, daemons, tmp_path):
    (tmp_path / "transports").write_text(f"x.example queue/upper {tmp_path}\n")
    daemon = daemons("--transports", str(tmp_path / "transports"), maildir=False)
    upper.uninstall()
    assert isinstance(build_transports(Config())["queue/upper"], Unavailable)
    queue_id = Spool(daemon.spool).enqueue("s@example.org", ["u@x.example"], b"Subject: late\r\n\r\nlate\r\n")
    wait_for(lambda: (daemon.spool / "deferred" / queue_id).exists(), what="deferral")
    wait_for(lambda: (f"{queue_id}: to=<u@x.example>, relay=none, " in daemon.log()
                      and "dsn=4.3.0, status=deferred (transport queue/upper is not installed)" in daemon.log()),
             what="the deferral logged")
    assert daemon.stop() == 0


def test_the_documented_example_is_the_tested_one():
    code = (EXAMPLE / "qrouter_upper.py").read_text()
    documented = (EXAMPLE.parent.parent / "docs" / "transports.md").read_text()
    assert code[code.index("import itertools"):] in documented
    assert (EXAMPLE / "pyproject.toml").read_text().split("\n\n", 1)[1] in documented
