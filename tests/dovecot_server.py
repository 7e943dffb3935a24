"""A real Dovecot (Debian's dovecot-core and dovecot-lmtpd) serving LMTP on a Unix socket, for the
tests that need a next hop which knows its users: its users come from a passwd-file, and it
answers RCPT for anyone else with 550 5.1.1, as a mail store behind an MTA does.

It runs in the foreground (`dovecot -F`) with a config of its own in a fresh directory under /tmp
(Dovecot's own processes run as its users dovecot and dovenull, and mail is stored as nobody:
they must reach it), and it is stopped and its directory removed on exit.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.daemon import wait_for

DOVECOT = "/usr/sbin/dovecot"

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = lmtp
ssl = no
listen = 127.0.0.1
auth_username_format = %Ln
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
  default_fields = uid=nobody gid=nogroup home={root}/home/%u
}}
mail_location = maildir:{root}/mail/%u
service lmtp {{
  unix_listener {root}/lmtp {{
    mode = 0666
  }}
}}
"""


class DovecotLMTP:
    """Dovecot's LMTP at `socket`, knowing `users` (local parts, any domain); mail for a user
    lands in the Maildir `maildir(user)`."""

    def __init__(self, users: list[str]) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="qrtest-dovecot-", dir="/tmp"))
        self.root.chmod(0o755)
        self.socket = str(self.root / "lmtp")
        self.process: subprocess.Popen | None = None
        (self.root / "users").write_text("".join(f"{user}:{{PLAIN}}unused::::::\n" for user in users))
        for name in ("home", "mail"):
            (self.root / name).mkdir(mode=0o777)
            (self.root / name).chmod(0o777)
        (self.root / "dovecot.conf").write_text(CONFIG.format(root=self.root))

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> DovecotLMTP:
        output = open(self.root / "dovecot.out", "wb")
        self.process = subprocess.Popen([DOVECOT, "-F", "-c", str(self.root / "dovecot.conf")],
                                        stdout=output, stderr=output, stdin=subprocess.DEVNULL)
        output.close()
        wait_for(lambda: Path(self.socket).exists() or self.process.poll() is not None, what="Dovecot's LMTP socket")
        assert self.process.poll() is None, (self.root / "dovecot.out").read_text(errors="replace") + self.log()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
