"""A private Postfix, the reference the relaying benchmarks measure qrouter against in the same run.

Debian's postfix package is downloaded and unpacked into a cache directory, never installed: it
would replace the machine's MTA. Its master runs with a configuration directory of its own (`-c`),
its own queue, and its defaults but for what a private instance needs (no chroot, smtpd on a
loopback port, a transport map to the sink, a log file). Needs root (Postfix's master starts as
root and becomes `postfix`), as the benchmarks do.

Mail is queued while nothing may leave (`defer_transports = smtp`), so that the measurement starts,
as qrouter's does, with every message in the queue and the daemon stopped; it ends when the sink
has accepted them all.
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
import shlex
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

CACHE = Path(os.environ.get("QROUTER_BENCH_CACHE", "/var/cache/qrouter-bench"))
USER, GROUP = "postfix", "postdrop"
START_TIMEOUT = 30.0


class PostfixError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unpacked() -> Path:
    """The root of the unpacked package, downloaded on first use."""
    root = CACHE / "postfix"
    if (root / "usr/lib/postfix/sbin/master").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    download = CACHE / "download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir()
    os.chmod(download, 0o777)  # apt's download user writes here
    subprocess.run(["apt-get", "download", "postfix"], cwd=download, check=True, capture_output=True)
    [package] = glob.glob(str(download / "postfix_*.deb"))
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", package, str(root)], check=True)
    shutil.copy(root / "usr/share/postfix/dynamicmaps.cf", root / "etc/postfix")  # as the package's postinst does
    return root


def ensure_accounts() -> None:
    """The user and group Postfix runs as and submits with, made if the machine has none."""
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", USER], check=True)


class PrivatePostfix:
    """One Postfix instance under `home`, relaying each domain of `routes` (domain -> port on
    127.0.0.1) to that port, with smtpd on a free loopback port (`port`)."""

    def __init__(self, home: Path, routes: dict[str, int]) -> None:
        self.home, self.routes, self.port = home, routes, _free_port()
        self.package = unpacked()
        ensure_accounts()
        self.config = home / "etc"
        self.maillog = home / "maillog"
        self._write_config()
        shutil.chown(home / "data", USER)

    def _write_config(self) -> None:
        package, home = self.package, self.home
        for name in ("etc", "queue", "data"):
            (home / name).mkdir(parents=True, exist_ok=True)
        (self.config / "transport").write_text(
            "".join(f"{domain} smtp:[127.0.0.1]:{port}\n" for domain, port in self.routes.items()))
        master = []
        for line in (package / "usr/share/postfix/master.cf.dist").read_text().splitlines():
            fields = line.split()
            if line.startswith("smtp ") and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{self.port}"
            if not line.startswith(("#", " ")) and len(fields) >= 8 and fields[4] == "y":
                fields[4] = "n"  # no chroot: the instance has no /etc of its own to copy in
            master.append(" ".join(fields) if fields and not line.startswith(("#", " ")) else line)
        (self.config / "master.cf").write_text("\n".join(master) + "\n")
        library = package / "usr/lib/postfix"
        (self.config / "main.cf").write_text("\n".join([
            "compatibility_level = 3.6",
            f"queue_directory = {home / 'queue'}",
            f"data_directory = {home / 'data'}",
            f"command_directory = {package / 'usr/sbin'}",
            f"daemon_directory = {library / 'sbin'}",
            f"meta_directory = {package / 'etc/postfix'}",
            f"shlib_directory = {library}",
            f"sendmail_path = {package / 'usr/sbin/sendmail'}",
            f"mail_owner = {USER}",
            f"setgid_group = {GROUP}",
            "myhostname = postfix.bench.example",
            "mydestination =",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "alias_maps =",
            "alias_database =",
            f"maillog_file = {self.maillog}",
            f"maillog_file_prefixes = {home}",
            f"import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH={library}",
            f"transport_maps = texthash:{self.config / 'transport'}",
            "smtp_tls_security_level = none",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            "",
        ]))

    def _postfix(self, *args: str) -> str:
        """Run a Postfix command of the package on this instance; its words on failure."""
        command = [str(self.package / "usr/sbin" / args[0]), "-c", str(self.config), *args[1:]]
        env = {**os.environ, "LD_LIBRARY_PATH": str(self.package / "usr/lib/postfix")}
        # Postfix commands speak to a terminal or to syslog; a pseudo-terminal gets their words
        result = subprocess.run(["script", "-qec", shlex.join(command), "/dev/null"], env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise PostfixError(f"{' '.join(args)}: {result.stdout.strip()} {result.stderr.strip()}")
        return result.stdout

    def set(self, *settings: str) -> None:
        self._postfix("postconf", "-e", *settings)

    def start(self) -> None:
        self._postfix("postfix", "start")

    def stop(self) -> None:
        self._postfix("postfix", "stop")

    def queued(self, queue: str) -> int:
        return sum(len(files) for _, _, files in os.walk(self.home / "queue" / queue))

    def queue(self, sender: str, messages: Iterable[tuple[str, bytes]], count: int) -> None:
        """Put `count` messages (recipient, bytes) into the queue, none leaving: through smtpd while
        delivery is deferred, then the daemon stopped with them all in deferred/."""
        self.set("defer_transports = smtp")
        self.start()
        with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
            for recipient, body in messages:
                client.sendmail(sender, [recipient], body)
        deadline = time.monotonic() + 300
        while self.queued("deferred") < count:
            if time.monotonic() > deadline:
                raise PostfixError(f"only {self.queued('deferred')} of {count} messages reached deferred/")
            time.sleep(0.2)
        self.stop()
        self.set("defer_transports =")

    def flush(self) -> None:
        """Ask the running queue manager to deliver all deferred mail now (postqueue -f)."""
        self._postfix("postqueue", "-f")

    def master_pid(self) -> int:
        """The running master's process id, from its pid file."""
        return int((self.home / "queue/pid/master.pid").read_text().split()[0])
