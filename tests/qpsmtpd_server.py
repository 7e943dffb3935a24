"""The real qpsmtpd (Debian's qpsmtpd-forkserver) with the queue/router plugin from packaging/,
on a free loopback port, and swaks as its client.

Each server runs in a mount namespace of its own (`unshare --mount`), so a test can make the
spool read-only for qpsmtpd alone with `read_only()`: the bind mounts vanish with the server.
There, /etc/resolv.conf names a DNS server of the test's on loopback (see `QpsmtpdServer`).
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.daemon import ROOT, wait_for
from tests.dns_server import DNSServer
from tests.smtp_servers import free_port

PLUGIN_DIR = ROOT / "packaging" / "qpsmtpd"
SYSTEM_PLUGINS = "/usr/share/qpsmtpd/plugins"
FORKSERVER = "/usr/bin/qpsmtpd-forkserver"
SWAKS = "/usr/bin/swaks"
QROUTER = str(Path(sys.executable).parent / "qrouter")  # the command the plugin runs
ME = "qpsmtpd.example.test"


class QpsmtpdServer:
    """qpsmtpd-forkserver with `relay`, `rcpt_ok` and `queue/router ARGS`, running as `user`
    (by default ours); log in `log_path`. 127.0.0.1 is a relay client unless `config` (qpsmtpd
    config files by name, over the defaults) says otherwise.

    qpsmtpd looks up the name of every client (its --no-rdns is not acted on), with Net::DNS,
    which under perl -T takes its server from /etc/resolv.conf only. In the server's namespace
    that file names a DNS server on loopback which says at once that 127.0.0.1 has no name: the
    system's DNS server may drop a question, and the client then waits seconds for the greeting.
    Its `port` option is Net::DNS's; the C library ignores it and would ask 127.0.0.1:53.

    `timeout:1 attempts:2` (Net::DNS's retrans and retry, as the C library's) bound what an
    answer that never comes costs the client: 1 s, then 2 s, and qpsmtpd greets it as Unknown,
    as it does when the answer is NXDOMAIN. Net::DNS's own default is 5 s doubled over 4 tries,
    75 s, longer than a client waits for the greeting (swaks and smtplib here: 60 s)."""

    def __init__(self, directory: Path, plugin_args: list[str], user: str | None = None,
                 config: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.config_dir = directory / "config"
        self.log_path = directory / "qpsmtpd.log"
        self.pid_file = directory / "qpsmtpd.pid"
        self.plugin_args = plugin_args
        self.user = user or pwd.getpwuid(os.getuid()).pw_name
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.dns: DNSServer | None = None
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (directory / "qpsmtpd-spool").mkdir(mode=0o700, exist_ok=True)
        account = pwd.getpwnam(self.user)
        os.chown(directory / "qpsmtpd-spool", account.pw_uid, account.pw_gid)
        files = {
            "plugin_dirs": f"{PLUGIN_DIR}\n{SYSTEM_PLUGINS}\n",
            "plugins": "relay\nrcpt_ok\n" + " ".join(["queue/router", *plugin_args]) + "\n",
            "relayclients": "127.0.0.1\n",
            "rcpthosts": "",
            "spool_dir": f"{directory / 'qpsmtpd-spool'}\n",
            "me": f"{ME}\n",
            "loglevel": "6\n",  # LOGINFO, to stderr (no logging plugins)
            "logging": "",
            **(config or {}),  # the test's own qpsmtpd config files, e.g. no relayclients
        }
        for name, text in files.items():
            (self.config_dir / name).write_text(text)

    def start(self, wait: bool = True) -> QpsmtpdServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RES_")}
        env["QPSMTPD_CONFIG"] = str(self.config_dir)
        self.dns = DNSServer("", origin="127.in-addr.arpa.").start()
        resolv_conf = self.directory / "resolv.conf"
        resolv_conf.write_text(f"nameserver {self.dns.host}\noptions port:{self.dns.port} timeout:1 attempts:2\n")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private",
             "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv_conf),
             FORKSERVER, "--listen-address", "127.0.0.1",
             "--port", str(self.port), "--user", self.user, "--pid-file", str(self.pid_file),
             "--limit-connections", "40", "--max-from-ip", "40"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=self.directory, start_new_session=True)
        log.close()
        if wait:
            wait_for(lambda: "Running as user" in self.log() or self.process.poll() is not None,
                     timeout=60, what="qpsmtpd to start")
            assert self.process.poll() is None, f"qpsmtpd exited {self.process.returncode}:\n{self.log()}"
        return self

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def read_only(self, directory: Path) -> None:
        """Make `directory` read-only for this qpsmtpd and its children only."""
        self._in_namespace(f'mount --bind "{directory}" "{directory}" && '
                           f'mount -o remount,ro,bind "{directory}"')

    def writable(self, directory: Path) -> None:
        self._in_namespace(f'umount "{directory}"')

    def _in_namespace(self, script: str) -> None:
        assert self.process is not None
        subprocess.run(["nsenter", "--target", str(self.process.pid), "--mount", "sh", "-c", script],
                       check=True, capture_output=True, timeout=10)

    def stop(self) -> None:
        """Stop the forkserver and every connection child (its process group)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the forkserver passes SIGINT to its children
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.dns is not None:  # a test may stop its server before the fixture does
            self.dns.stop()
            self.dns = None


def swaks(port: int, *args: str, data: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run swaks against 127.0.0.1:port; with `data`, the file is sent as the DATA part as it is
    (it must be dot-stuffed and end with CRLF "."; swaks adds the final CRLF)."""
    command = [SWAKS, "--server", "127.0.0.1", "--port", str(port), "--helo", "client.example.test",
               "--timeout", "60", *args]
    if data is not None:
        command += ["--data", f"@{data}", "--no-data-fixup", "--suppress-data"]
    return subprocess.run(command, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def smtp_data(message: bytes) -> bytes:
    """The DATA part for `swaks --no-data-fixup`: dot-stuffed, ended by the terminating dot."""
    assert message.endswith(b"\r\n")
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in message[:-2].split(b"\r\n"))
    return stuffed + b"\r\n."


def daemon_pid(spool: Path) -> int:
    """The pid in SPOOL/qrouter.pid, 0 if there is none."""
    try:
        text = (spool / "qrouter.pid").read_text().strip()
    except FileNotFoundError:
        return 0
    return int(text) if text.isdigit() else 0


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_daemon(spool: Path) -> None:
    """Stop the qrouter daemon named by SPOOL/qrouter.pid, and anything left in its session."""
    pid = daemon_pid(spool)
    if not pid or not alive(pid):
        return
    try:
        session = os.getsid(pid)
    except ProcessLookupError:
        return
    if session == os.getsid(0):
        raise AssertionError(f"pid {pid} in {spool}/qrouter.pid is not a daemon of its own session")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.pid != os.getpid():
                process.kill()
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
