"""`qrouter top` on a real terminal: tmux runs it in a 240x40 pane, as an administrator over ssh
would, beside a real daemon delivering to a slow SMTP server (tests/smtp_servers.py CountingSink)
so that mail is in flight while the view is read. After the view, the pane's shell records the
exit status and the terminal's modes, so a view that left the terminal in cbreak mode or in the
alternate screen is seen.
"""

from __future__ import annotations

import os
import pty
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from router.spool import Spool
from tests.daemon import ROOT, qrouter, wait_for
from tests.smtp_servers import CountingSink

COLUMNS = 240  # wide enough for the header with a long spool path (pytest's, in CI) on one line
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"
SENT_RATE = re.compile(r"sent (\d+\.\d)/s")


def top_command(spool: Path) -> str:
    """The shell command that starts the view, as an administrator types it."""
    return f"{shlex.quote(sys.executable)} -m router top --queue-dir {shlex.quote(str(spool))}"


class Pane:
    """One tmux session on a tmux server of the test's own: its socket in the test's directory
    (tmux leaves the file behind), no config file."""

    def __init__(self, tmp: Path) -> None:
        self.server = str(tmp / "tmux")
        self.exit_file = tmp / "top.exit"
        self.modes_file = tmp / "top.stty"

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.server, "-f", "/dev/null", *args], check=True,
                              capture_output=True, text=True, timeout=10).stdout

    def start(self, command: str) -> None:
        """Run `command`; then record its exit status and the terminal modes, and keep the pane
        open so that its screen can still be read. The shell traps SIGINT (a handler, which the
        command does not inherit as it would an ignored signal) to outlive a Ctrl-C, as an
        interactive shell does."""
        script = (f"cd {shlex.quote(str(ROOT))}; trap : INT; {command}; echo EXIT=$? > {self.exit_file}; "
                  f"stty -a > {self.modes_file}; sleep 60")
        self.tmux("new-session", "-d", "-x", str(COLUMNS), "-y", "40", "sh", "-c", script)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def wait_screen(self, shows: Callable[[str], bool], what: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while not shows(screen := self.screen()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; the screen:\n{screen}")
            time.sleep(0.1)
        return screen

    def exit_status(self) -> str:
        """What the shell recorded once the view ended; asserts the terminal was given back:
        canonical mode with echo, the normal screen, the cursor shown."""
        wait_for(lambda: self.modes_file.exists() and self.modes_file.stat().st_size, 10, "the view to end")
        modes = self.modes_file.read_text().split()
        assert "icanon" in modes and "echo" in modes, modes
        assert self.tmux("display-message", "-p", "#{alternate_on} #{cursor_flag}").split() == ["0", "1"]
        return self.exit_file.read_text().strip()


@contextmanager
def terminal(tmp: Path) -> Iterator[Pane]:
    pane = Pane(tmp)
    try:
        yield pane
    finally:
        subprocess.run(["tmux", "-S", pane.server, "kill-server"], capture_output=True, timeout=10)


def sent_per_second(screen: str) -> float:
    found = SENT_RATE.search(screen)
    return float(found[1]) if found else 0.0


def test_view_of_a_daemon_delivering_quits_on_q(daemons, tmp_path):
    with CountingSink(delay=0.2) as sink:
        daemon = daemons("--relayhost", f"[127.0.0.1]:{sink.port}", "--destination-concurrency", "4")
        pids = daemon.worker_pids()
        with terminal(tmp_path) as pane:
            # A stale size in the environment (readline exports one to what it starts) must not
            # win over the terminal's own: the view uses all the pane's columns.
            pane.start(f"COLUMNS=80 LINES=24 {top_command(daemon.spool)}")
            # the mail queued once the view is up, so that it samples the deliveries however slow its start
            pane.wait_screen(lambda screen: f"qrouter pid {daemon.process.pid}" in screen, "the view")
            spool = Spool(daemon.spool)
            for i in range(80):
                spool.enqueue("a@example.org", [f"u{i}@example.net"], MESSAGE)
            screen = pane.wait_screen(
                lambda screen: all(str(pid) in screen for pid in pids) and f"[127.0.0.1]:{sink.port}" in screen
                and sent_per_second(screen) > 0, "workers, the destination and a sent rate")
            assert re.search(r"^qrouter pid \d+, up .*\(q or Ctrl-C quits\)$", screen, re.MULTILINE), screen
            assert max(map(len, screen.splitlines())) > 80, screen
            for shown in ("incoming", "active", "deferred", "hold", "corrupt", "archive", "network"):
                assert shown in screen, screen
            assert pane.tmux("display-message", "-p", "#{alternate_on}").strip() == "1"
            pane.tmux("send-keys", "q")
            assert pane.exit_status() == "EXIT=0"


def test_ctrl_c_quits_cleanly(daemons, tmp_path):
    daemon = daemons()
    with terminal(tmp_path) as pane:
        pane.start(top_command(daemon.spool))
        pane.wait_screen(lambda screen: f"qrouter pid {daemon.process.pid}" in screen, "the daemon's pid")
        pane.tmux("send-keys", "C-c")
        assert pane.exit_status() == "EXIT=0"


def test_without_a_daemon_the_view_says_so_and_finds_it_once_started(daemons, tmp_path):
    daemon = daemons(start=False)
    with terminal(tmp_path) as pane:
        pane.start(top_command(daemon.spool))
        pane.wait_screen(lambda screen: "no daemon" in screen and "asking again" in screen, "no daemon")
        time.sleep(1.5)  # a redraw or two without a daemon: the view keeps going
        pane.wait_screen(lambda screen: "no daemon" in screen, "no daemon, still")
        daemon.start()
        pane.wait_screen(lambda screen: f"qrouter pid {daemon.process.pid}" in screen, "the daemon, once started")
        pane.tmux("send-keys", "q")
        assert pane.exit_status() == "EXIT=0"


def test_not_on_a_terminal_it_prints_one_plain_snapshot(daemons, tmp_path):
    missing = qrouter("top", "--queue-dir", str(tmp_path / "nothing"))
    assert missing.returncode == 75 and b"no daemon" in missing.stdout, missing
    daemon = daemons()
    Spool(daemon.spool).enqueue("a@example.org", ["u@example.net"], MESSAGE)
    daemon.wait_idle()
    result = qrouter("top", "--queue-dir", str(daemon.spool), check=True)
    out = result.stdout.decode()
    assert "\x1b" not in out and "q or Ctrl-C" not in out, out
    assert f"qrouter pid {daemon.process.pid}" in out
    for pid in daemon.worker_pids():
        assert re.search(rf"^ *{pid} +network ", out, re.MULTILINE), out
    assert re.search(r"^ *queue +incoming +active +deferred +hold +corrupt +archive$", out, re.MULTILINE), out
    assert "deliveries per second: measuring\nsince start: 1 sent, 0 deferred, 0 bounced" in out, out


def test_text_from_outside_is_shown_as_it_is_never_read_as_markup(daemons, tmp_path):
    """A destination's name and last error come from the policy and from peers: rich must not
    take `[/...]` in them for its markup (it raised MarkupError and the view crashed)."""
    socket = tmp_path / "no-such" / "lmtp.sock"
    daemon = daemons("--default-transport", f"lmtp:{socket}")
    Spool(daemon.spool).enqueue("a@example.org", ["u@example.net"], MESSAGE)
    wait_for(lambda: any(destination["last_error"] for destination in daemon.status()["destinations"]),
             20, "the LMTP delivery to fail")
    result = qrouter("top", "--queue-dir", str(daemon.spool))
    out = result.stdout.decode()
    assert result.returncode == 0, result
    unfolded = "".join(out.split())  # long cells are folded over lines
    assert f"[{socket}]" in unfolded, out


def test_on_a_terminal_that_reports_no_size_it_says_so(daemons, tmp_path):
    """A new pseudo-terminal reports 0x0, as a serial line does: nothing can be drawn, and the
    view says why instead of drawing nothing and exiting 0."""
    daemon = daemons()
    main, side = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "router", "top", "--queue-dir", str(daemon.spool)],
                              stdin=side, stdout=side, stderr=subprocess.PIPE, cwd=ROOT, timeout=30)
    finally:
        os.close(side)
        os.close(main)
    assert done.returncode == 1, done
    assert b"the terminal reports its size as 0x0" in done.stderr and b"stty rows" in done.stderr, done.stderr
