"""A real validating resolver (Debian's unbound) on a loopback port of its own, and zones signed
with ldns (Debian's ldnsutils), so DNSSEC is what the field does: signatures made by ldns-signzone,
served by NSD (tests/nsd_server.py), checked by Unbound against the test's trust anchor.

The instance is entirely ours (tests.nsd_server.DNSDaemon): its configuration and pid file are in
a temporary directory, it runs in the foreground (`-d`, no systemd, no chroot, keeps the user it
was started as) and logs to stderr, it has no remote control and no trust anchor but the test's,
and it asks only the stub zones the test names. Debian's own unbound service, if one runs, is
left alone on port 53.
"""

from __future__ import annotations

from pathlib import Path

import dns.name

from tests.dns_server import zone_file
from tests.nsd_server import HOST, DNSDaemon, run_checked

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
        self.ksk = run_checked([KEYGEN, "-a", ALGORITHM, "-k", self.origin], "ldns-keygen", directory).strip()
        self.zsk = run_checked([KEYGEN, "-a", ALGORITHM, self.origin], "ldns-keygen", directory).strip()

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
        run_checked([SIGNZONE, "-o", self.origin, "-f", str(signed), str(unsigned), self.ksk, self.zsk],
                    "ldns-signzone", self.directory)
        return signed.read_text()


class Unbound(DNSDaemon):
    """unbound validating with `anchors` (DS records) and asking the servers of `stubs`
    ({zone: "IP@PORT"}) for those zones; every other name goes unanswered."""

    NAME = "unbound"

    def __init__(self, stubs: dict[str, str], anchors: list[str], start_within: float = 15) -> None:
        super().__init__(start_within)
        self.stubs = stubs
        self.anchors = anchors

    def _probe(self) -> dns.name.Name:
        return dns.name.from_text(next(iter(self.stubs)))

    def _configure(self, directory: Path) -> list[str]:
        anchored = {anchor.split()[0] for anchor in self.anchors}
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
            "  use-syslog: no",  # and no logfile: to stderr
            "  verbosity: 1",
            "  val-log-level: 2",  # says why an answer is bogus
            "  access-control: 127.0.0.0/8 allow",
            "  do-not-query-localhost: no",  # the stub zones' servers are on loopback
            '  module-config: "validator iterator"',
            "  val-permissive-mode: no",
            "  qname-minimisation: no",
            *(f'  local-zone: "{zone}" nodefault' for zone in self.stubs),  # unbound answers test. itself
            *(f'  trust-anchor: "{anchor}"' for anchor in self.anchors),
            *(f'  domain-insecure: "{zone}"' for zone in self.stubs if zone not in anchored),
            "remote-control:",
            "  control-enable: no",
        ]
        for zone, address in self.stubs.items():
            lines += ["stub-zone:", f'  name: "{zone}"', f"  stub-addr: {address}"]
        conf = directory / "unbound.conf"
        conf.write_text("\n".join(lines) + "\n")
        run_checked([CHECKCONF, str(conf)], "unbound-checkconf")
        return [DAEMON, "-d", "-c", str(conf)]
