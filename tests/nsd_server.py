"""The real NSD (Debian's nsd) serving one zone on a free loopback port.

With it, what the daemon resolves is what an authoritative server in the field answers, not
only what the small server of our own in tests/dns_server.py makes of a zone. That one stays for
what NSD cannot do: answer SERVFAIL on demand, stay silent, and record the questions it was asked.

The instance is entirely ours: its configuration, zone file, pid file, database and xfrd
files are in a temporary directory, it listens on 127.0.0.1 only, does not chroot, keeps the
user it was started as (so it can read those files), and has no remote control. Debian's own
nsd service, if one runs, is left alone on port 53. What running such a server takes (the free
port, the temporary directory, the wait for its first answer, the stop) is DNSDaemon's, which
tests/unbound_server.py's Unbound shares.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

from tests.dns_server import zone_file
from tests.smtp_servers import free_port

DAEMON = "/usr/sbin/nsd"
CHECKCONF = "/usr/sbin/nsd-checkconf"
CHECKZONE = "/usr/sbin/nsd-checkzone"
HOST = "127.0.0.1"


class DNSDaemon:
    """A name server of the test's own, run in the foreground on HOST at a free port with its
    files in a temporary directory; what it writes goes to `stderr()`. A subclass writes its
    configuration and says how to run it (`_configure`), and which zone it serves (`_probe`):
    it counts as started once it answers that zone's SOA.

    Use as a context manager; `servers` is the matching `dns-servers` value."""

    NAME = "dns"

    def __init__(self, start_within: float = 15) -> None:
        self.start_within = start_within
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._directory: tempfile.TemporaryDirectory | None = None
        self._stderr: Path | None = None

    @property
    def servers(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> Self:
        self._directory = tempfile.TemporaryDirectory(prefix=f"{self.NAME}-")
        try:
            directory = Path(self._directory.name)
            self.port = free_udp_and_tcp_port()
            command = self._configure(directory)
            self._stderr = directory / f"{self.NAME}.stderr"
            with open(self._stderr, "wb") as stderr:
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                                cwd=directory, start_new_session=True)
            self._wait_until_it_answers()
        except BaseException:
            self.stop()
            raise
        return self

    def _configure(self, directory: Path) -> list[str]:
        """Write the configuration into `directory`; the command that runs the server."""
        raise NotImplementedError

    def _probe(self) -> dns.name.Name:
        """A zone it serves."""
        raise NotImplementedError

    def _wait_until_it_answers(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_within
        question = dns.message.make_query(self._probe(), dns.rdatatype.SOA)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.NAME} exited with status {self.process.returncode}:\n{self.stderr()}")
            try:
                answer = dns.query.udp(question, HOST, port=self.port, timeout=0.2)
                if answer.rcode() == dns.rcode.NOERROR and answer.answer:
                    return
            except (dns.exception.DNSException, OSError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.NAME} gave no SOA for {self._probe()} within {self.start_within} s:\n"
                                   f"{self.stderr()}")
            time.sleep(0.05)

    def stderr(self) -> str:
        """What the server wrote (its log: in the foreground it keeps it on stderr), while it runs
        or when it is gone."""
        return self._stderr.read_text(errors="replace") if self._stderr and self._stderr.exists() else ""

    def stop(self) -> None:
        """SIGTERM, SIGKILL to what is left of it (its children too) after a few seconds; reaped."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the server and its children
                    self.process.wait()
            self.process = None
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class NSD(DNSDaemon):
    """nsd serving `zone_text` (zone-file syntax; the SOA and NS records are added) for `origin`;
    with `complete`, `zone_text` is a whole zone file served as it is (a signed one, say)."""

    NAME = "nsd"

    def __init__(self, zone_text: str, origin: str = "test.", start_within: float = 15,
                 complete: bool = False) -> None:
        super().__init__(start_within)
        self.origin = dns.name.from_text(origin)
        self.zone_text = zone_text
        self.complete = complete

    def _probe(self) -> dns.name.Name:
        return self.origin

    def _configure(self, directory: Path) -> list[str]:
        zone = directory / "zone"
        zone.write_text(self.zone_text if self.complete else zone_file(self.zone_text, self.origin))
        conf = directory / "nsd.conf"
        conf.write_text(
            "server:\n"
            f"  ip-address: {HOST}\n"
            f"  port: {self.port}\n"
            "  do-ip6: no\n"
            "  server-count: 1\n"
            "  reuseport: no\n"
            "  verbosity: 1\n"
            '  chroot: ""\n'
            '  username: ""\n'
            f'  zonesdir: "{directory}"\n'
            f'  pidfile: "{directory / "nsd.pid"}"\n'
            f'  database: "{directory / "nsd.db"}"\n'
            f'  zonelistfile: "{directory / "zone.list"}"\n'
            f'  xfrdfile: "{directory / "xfrd.state"}"\n'
            f'  xfrdir: "{directory}"\n'
            "remote-control:\n"
            "  control-enable: no\n"
            "zone:\n"
            f'  name: "{self.origin}"\n'
            f'  zonefile: "{zone}"\n')
        run_checked([CHECKCONF, str(conf)], "nsd-checkconf")
        run_checked([CHECKZONE, self.origin.to_text(), str(zone)], "nsd-checkzone")
        return [DAEMON, "-d", "-c", str(conf)]


def free_udp_and_tcp_port() -> int:
    """A port free on HOST for TCP (free_port's test) and for UDP too, which nsd also binds."""
    for _ in range(20):
        port = free_port(HOST)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no port free for both UDP and TCP on {HOST}")


def run_checked(command: list[str], name: str, cwd: Path | None = None) -> str:
    """Run a tool of the server's; what it printed, or RuntimeError with that when it failed."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed with status {result.returncode}:\n{result.stdout}{result.stderr}")
    return result.stdout
