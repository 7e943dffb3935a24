"""queue/qpsmtpd PLUGIN [ARGS...]: delivery by a qpsmtpd queue plugin, run as qpsmtpd runs it.

PLUGIN is a plugin under qpsmtpd's plugin directory (`queue/smtp-forward`, `queue/maildir`,
`queue/qmail-queue`...) or an absolute path, and ARGS are its arguments as on a line of qpsmtpd's
config/plugins. The plugin runs in a Perl helper, qpsmtpd_queue.pl beside this file, that loads it
with qpsmtpd's own classes and calls its queue hook on a Qpsmtpd::Transaction made from the
message; its config('...') files come from qpsmtpd's config directory, and config('me') is
qrouter's host name. The helper lives on between messages (a plugin is loaded once per helper,
not once per message): each worker keeps up to MAX_HELPERS of them, started when needed, each
serving one message at a time, and replaces one that dies.

The plugin gets the message after a Received: field naming the hand-off (router/spool/trace.py), as
qpsmtpd's own SMTP server puts one before the message it hands its queue plugin: it counts as a
hop, so mail that comes back here ends at hopcount-limit instead of going round for ever.

The answer is mapped as qpsmtpd answers its client after the queue hook: OK delivered (2.0.0),
DENY and DENY_DISCONNECT bounced (552 there; 5.3.0, or the enhanced code the plugin's text starts
with), anything else deferred (4.3.0, or the plugin's code), and so is a plugin that dies. One
thing more: a plugin that declines after a server refused the message for good (smtp-forward
declines alike for a 554 and a 451) gets that server's verdict, a bounce; a refused RCPT bounces
that recipient alone.

A plugin answers for the whole transaction: every recipient gets the same outcome, but for that
refused RCPT. Delivered means what the plugin says: Debian's queue/maildir, for one, does not
fsync.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from policy.next_hop import NextHop
from router.logs.lines import logger
from router.spool.durable import write_all
from router.spool.headers import prepend_fields
from router.spool.queue_file import QueueFile, Recipient
from router.spool.trace import received
from workers.transport import BOUNCED, DEFERRED, SENT, Outcome

if TYPE_CHECKING:
    from router.config import Config

log = logger("qpsmtpd")  # as its deliveries speak (router/logs/lines.py service_of)

PLUGINS = "/usr/share/qpsmtpd/plugins"
CONFIG_DIR = "/etc/qpsmtpd"  # qpsmtpd's own, as Debian installs it: qrouter runs beside that qpsmtpd
PERL = "/usr/bin/perl"
HELPER = str(Path(__file__).with_name("qpsmtpd_queue.pl"))
ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "QPSMTPD_CONFIG": CONFIG_DIR}  # all a helper gets
MAX_HELPERS = 4  # per worker: deliveries beyond that wait for a free one
IDLE_SECONDS = 60.0  # a helper unused this long is stopped
STOP_SECONDS = 2.0  # a helper whose input is closed exits at once; one that does not is killed

_FRAME = struct.Struct(">I")
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?=\s|$)")
_REFUSED_RCPT = re.compile(r"RCPT TO:<(.*)>.*", re.IGNORECASE)


class HelperError(Exception):
    """The helper failed (died, fell silent): it is useless now, and the message is deferred."""


class QpsmtpdTransport:
    """Registered as `qpsmtpd` in the entry point group qrouter.transports (pyproject.toml)."""

    def __init__(self, config: Config) -> None:
        self.hostname = config.hostname
        self.time_limit = config.command_time_limit  # for one message: the plugin's work, as for any program
        self.idle: list[_Helper] = []
        self.running = 0  # helpers started and not stopped, idle or busy
        self.changed = threading.Condition()  # a helper came back or went

    @staticmethod
    def check(argument: str) -> None:
        """The plugin must exist, and the line be one qpsmtpd takes (printable ASCII)."""
        line = " ".join(argument.split())
        if not line:
            raise ValueError(f"needs a qpsmtpd queue plugin and its arguments, e.g. 'queue/qpsmtpd "
                             f"queue/smtp-forward 10.1.1.1 25' (found: {_found()})")
        if not all(" " <= char <= "~" for char in line):
            raise ValueError("qpsmtpd takes plugin lines of printable ASCII only")
        plugin = line.split(" ")[0]
        if not os.path.isfile(os.path.join(PLUGINS, plugin)):
            raise ValueError(f"no qpsmtpd plugin {plugin!r} in {PLUGINS} (found: {_found()})")

    def deliver(self, message: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        line = " ".join(hop.argument.split())
        plugin = line.split(" ")[0]
        relay = f"qpsmtpd[{plugin}]"
        # an absolute path is looked up as a plugin under "" (qpsmtpd tries DIR/PLUGIN), so that
        # no two files are compiled into one Perl package
        directory, line = ("", line[1:]) if plugin.startswith("/") else (PLUGINS, line)
        request = {"id": message.queue_id, "dir": directory, "line": line, "sender": message.sender,
                   "recipients": [rcpt.address for rcpt in recipients]}
        try:
            helper = self._take()
        except OSError as exc:
            return Outcome.same_for(recipients, DEFERRED, "4.3.0",
                                    f"cannot start the qpsmtpd helper: {exc.strerror or exc}", relay)
        if helper is None:
            return Outcome.same_for(recipients, DEFERRED, "4.3.0",
                                    f"no qpsmtpd helper became free within {self.time_limit:g}s", relay)
        try:
            answer = helper.ask(request, prepend_fields(message.message, [received(
                self.hostname, message.queue_id, request["recipients"], protocol="queue/qpsmtpd",
                when=time.time())]))
        except BaseException as exc:  # whatever it was, the helper is in no state to serve again
            helper.stop(kill=True)
            self._gone(1)
            if not isinstance(exc, HelperError):
                raise
            return Outcome.same_for(recipients, DEFERRED, "4.3.0", str(exc), relay)
        with self.changed:
            helper.idle_since = time.monotonic()
            self.idle.append(helper)
            self.changed.notify()
        return outcomes(answer, recipients, relay)

    def close_idle(self) -> None:
        now = time.monotonic()
        with self.changed:
            unused = [helper for helper in self.idle if now - helper.idle_since > IDLE_SECONDS]
            self.idle = [helper for helper in self.idle if helper not in unused]
        self._stop(unused)

    def close(self) -> None:
        with self.changed:
            unused, self.idle = self.idle, []
        self._stop(unused)

    def _take(self) -> _Helper | None:
        """An idle helper that is alive, else a new one while fewer than MAX_HELPERS run, else
        the first to come back; None if none does within command-time-limit."""
        deadline = time.monotonic() + self.time_limit
        dead: list[_Helper] = []
        try:
            with self.changed:
                while True:
                    while self.idle:
                        helper = self.idle.pop()
                        if helper.process.poll() is None:
                            return helper
                        dead.append(helper)
                    if self.running - len(dead) < MAX_HELPERS:
                        self.running += 1
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self.changed.wait(remaining):
                        return None
        finally:
            self._stop(dead)
        try:
            return _Helper(self.hostname, self.time_limit)
        except BaseException:
            self._gone(1)
            raise

    def _stop(self, helpers: list[_Helper]) -> None:
        for helper in helpers:
            helper.stop()
        self._gone(len(helpers))

    def _gone(self, count: int) -> None:
        """Count helpers as gone, so that waiting sessions may start others."""
        if count:
            with self.changed:
                self.running -= count
                self.changed.notify(count)


class _Helper:
    """One Perl process running HELPER: one request at a time, in its own process group, with
    nothing of ours but what ENVIRONMENT gives; its stderr goes to qrouter's log. Requests and
    answers go through the pipes' descriptors, never their Python buffers."""

    def __init__(self, hostname: str, time_limit: float) -> None:
        self.time_limit = time_limit
        self.spool = tempfile.mkdtemp(prefix="qrouter-qpsmtpd-")  # for its message bodies
        try:
            self.process = subprocess.Popen([PERL, HELPER, hostname, self.spool], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENVIRONMENT, cwd="/",
                                            process_group=0)
        except BaseException:
            shutil.rmtree(self.spool)
            raise
        self.idle_since = time.monotonic()
        threading.Thread(target=self._log, args=(self.process.stderr,), name=f"qpsmtpd-{self.process.pid}",
                         daemon=True).start()

    def ask(self, request: dict[str, Any], message: bytes) -> dict[str, Any]:
        """Send a request and wait for the answer, at most command-time-limit seconds."""
        assert self.process.stdin is not None
        try:
            for data in (json.dumps(request).encode(), message):
                write_all(self.process.stdin.fileno(), _FRAME.pack(len(data)))
                write_all(self.process.stdin.fileno(), data)
        except OSError as exc:
            raise HelperError(f"cannot write to the qpsmtpd helper: {exc.strerror or exc}") from None
        deadline = time.monotonic() + self.time_limit
        (size,) = _FRAME.unpack(self._read(_FRAME.size, deadline))
        return json.loads(self._read(size, deadline))

    def _read(self, size: int, deadline: float) -> bytes:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        data = b""
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise HelperError(f"the qpsmtpd plugin gave no answer within {self.time_limit:g}s")
            chunk = os.read(fd, size - len(data))
            if not chunk:
                raise HelperError(f"the qpsmtpd helper {self._ending()}")
            data += chunk
        return data

    def _ending(self) -> str:
        try:
            status = self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            return "closed its output"
        return f"exited with status {status}" if status >= 0 else f"was killed by signal {-status}"

    def stop(self, kill: bool = False) -> None:
        """Close its input, so that it exits; or kill it at once, with whatever it started (a
        plugin's programs): also when it lingers. Then remove its message bodies."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        try:
            self.process.wait(0 if kill else STOP_SECONDS)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process.stdout.close()
        shutil.rmtree(self.spool, ignore_errors=True)

    def _log(self, stderr: IO[bytes]) -> None:
        with stderr:
            for line in stderr:
                log.warning("queue/qpsmtpd helper %d: %s", self.process.pid,
                            line.decode("utf-8", "replace").rstrip())


def outcomes(answer: dict[str, Any], recipients: list[Recipient], relay: str) -> list[Outcome]:
    """The helper's answer as one outcome per recipient (the mapping in the module's docstring)."""
    rc, text, error, server = answer["rc"], answer["message"], answer["error"], answer["server"]
    refusal = server["reply"] if server and server["reply"][:1] in ("4", "5") else ""  # "554 5.6.0 ..."
    said = f"; {server['command']} answered {refusal}" if refusal else ""
    if error:
        return Outcome.same_for(recipients, DEFERRED, "4.3.0", f"the qpsmtpd plugin failed: {error}{said}", relay)
    if rc == "OK":
        return Outcome.same_for(recipients, SENT, "2.0.0", text or "queued", relay)
    if rc in ("DENY", "DENY_DISCONNECT"):
        return Outcome.same_for(recipients, BOUNCED, _code(text, "5", "5.3.0"), text or "message denied", relay)
    reply = f"{text or f'the plugin answered {rc}'}{said}"
    if rc == "DECLINED" and refusal.startswith("5"):  # the server's verdict, which the plugin did not pass on
        refused = _REFUSED_RCPT.fullmatch(server["command"])
        bounce = Outcome(BOUNCED, _code(refusal[4:], "5", "5.0.0"), reply, relay)
        later = Outcome(DEFERRED, "4.3.0", reply, relay)
        return [bounce if refused is None or refused[1] == rcpt.address else later for rcpt in recipients]
    return Outcome.same_for(recipients, DEFERRED, _code(text, "4", _code(refusal[4:], "4", "4.3.0")), reply, relay)


def _code(text: str, status_class: str, default: str) -> str:
    """The enhanced status code `text` starts with, if it is of that class; else `default`."""
    match = _ENHANCED.match(text)
    return match[0] if match and match[1] == status_class else default


def _found() -> str:
    """The queue plugins qpsmtpd has, for an error message."""
    try:
        names = sorted(f"queue/{name}" for name in os.listdir(os.path.join(PLUGINS, "queue")))
    except OSError:
        return f"none: is qpsmtpd installed? {PLUGINS}/queue cannot be read"
    return ", ".join(names) or "none"
