"""A real validating resolver (Debian's unbound) on a loopback port of its own, and zones signed
with ldns (Debian's ldnsutils), so DNSSEC is what the field does: signatures made by ldns-signzone,
served by NSD (tests/nsd_server.py), checked by Unbound against the test's trust anchor.

The instance is entirely ours: its configuration, pid file and log are in a temporary directory,
it runs in the foreground (`-d`, no systemd, no chroot, keeps the user it was started as), it has
no remote control and no trust anchor but the test's, and it asks only the stub zones the test
names. Debian's own unbound service, if one runs, is left alone on port 53.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

from tests.dns_server import zone_file
from tests.nsd_server import HOST, free_udp_and_tcp_port

DAEMON = "/usr/sbin/unbound"
CHECKCONF = "/usr/sbin/unbound-checkconf"
KEYGEN = "/usr/bin/ldns-keygen"
SIGNZONE = "/usr/bin/ldns-signzone"
ALGORITHM = "ECDSAP256SHA256"  # small keys, fast signatures


class ZoneKeys:
    """A key-signing and a zone-signing key for `origin`, made with ldns-keygen in `directory`."""

    def __init__(self, origin: str, directory: Path) -> None:
        self.origin = dns.name.from_text(origin).to_text()
        self.directory = directory
        self.ksk = _run([KEYGEN, "-a", ALGORITHM, "-k", self.origin], "ldns-keygen", directory).strip()
        self.zsk = _run([KEYGEN, "-a", ALGORITHM, self.origin], "ldns-keygen", directory).strip()

    @property
    def ds(self) -> str:
        """The DS record of the key-signing key: the trust anchor a validator starts from."""
        return (self.directory / f"{self.ksk}.ds").read_text().strip()

    def sign(self, zone_text: str) -> str:
        """`zone_text` (written as for tests.dns_server.zone_file: the SOA and NS are added) as a
        signed zone file, NSEC records and signatures valid from now for four weeks."""
        unsigned = self.directory / "zone"
        signed = self.directory / "zone.signed"
        unsigned.write_text(zone_file(zone_text, self.origin))
        _run([SIGNZONE, "-o", self.origin, "-f", str(signed), str(unsigned), self.ksk, self.zsk], "ldns-signzone",
             self.directory)
        return signed.read_text()


class Unbound:
    """unbound on HOST at a free port, validating with `anchors` (DS records) and asking the
    servers of `stubs` ({zone: "IP@PORT"}) for those zones; every other name goes unanswered.

    Use as a context manager; `servers` is the matching `dns-servers` value."""

    def __init__(self, stubs: dict[str, str], anchors: list[str], start_within: float = 15) -> None:
        self.stubs = stubs
        self.anchors = anchors
        self.start_within = start_within
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._directory: tempfile.TemporaryDirectory | None = None
        self._log: Path | None = None

    @property
    def servers(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> Unbound:
        self._directory = tempfile.TemporaryDirectory(prefix="unbound-")
        try:
            self._start(Path(self._directory.name))
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, directory: Path) -> None:
        self.port = free_udp_and_tcp_port()
        self._log = directory / "unbound.log"
        conf = directory / "unbound.conf"
        lines = [
            "server:",
            f"  interface: {HOST}@{self.port}",
            "  do-ip6: no",
            "  do-daemonize: no",
            "  num-threads: 1",
            "  so-reuseport: no",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{directory}"',
            f'  pidfile: "{directory / "unbound.pid"}"',
            "  use-syslog: no",
            f'  logfile: "{self._log}"',
            "  verbosity: 1",
            "  val-log-level: 2",  # says why an answer is bogus
            "  access-control: 127.0.0.0/8 allow",
            "  do-not-query-localhost: no",  # the stub zones' servers are on loopback
            '  module-config: "validator iterator"',
            "  val-permissive-mode: no",
            "  qname-minimisation: no",
            *(f'  local-zone: "{zone}" nodefault' for zone in self.stubs),  # unbound answers test. itself
            *(f'  trust-anchor: "{anchor}"' for anchor in self.anchors),
            *(f'  domain-insecure: "{zone}"' for zone in self.stubs
              if not any(anchor.split()[0] == zone for anchor in self.anchors)),
            "remote-control:",
            "  control-enable: no",
        ]
        for zone, address in self.stubs.items():
            lines += ["stub-zone:", f'  name: "{zone}"', f"  stub-addr: {address}"]
        conf.write_text("\n".join(lines) + "\n")
        _run([CHECKCONF, str(conf)], "unbound-checkconf", directory)
        self.process = subprocess.Popen([DAEMON, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=directory,
                                        start_new_session=True)
        self._wait_until_it_answers()

    def _wait_until_it_answers(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_within
        question = dns.message.make_query(dns.name.from_text(next(iter(self.stubs))), dns.rdatatype.SOA)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"unbound exited with status {self.process.returncode}:\n{self.log()}")
            try:
                answer = dns.query.udp(question, HOST, port=self.port, timeout=0.5)
                if answer.rcode() == dns.rcode.NOERROR and answer.answer:
                    return
            except (dns.exception.DNSException, OSError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"unbound gave no SOA within {self.start_within} s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        """What unbound logged, while it runs or when it is gone."""
        return self._log.read_text(errors="replace") if self._log and self._log.exists() else ""

    def stop(self) -> None:
        """SIGTERM, SIGKILL after a few seconds; reaped."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            self.process = None
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    def __enter__(self) -> Unbound:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _run(command: list[str], name: str, directory: Path) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=directory)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed with status {result.returncode}:\n{result.stdout}{result.stderr}")
    return result.stdout
