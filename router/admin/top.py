"""`qrouter top`: a live view of a running daemon, redrawn every second on a plain terminal.

It asks what `qrouter status` asks (the status socket, and the spool's queue directories counted
here rather than by the daemon, so a large archive/ never stalls the supervisor) and adds what one
answer cannot say: deliveries per second, from the daemon's counters sampled each second.

Only what rich's Live needs of a terminal is used (the alternate screen, cursor movement), so it
works over ssh; keys are read in cbreak mode with select, so waiting for a key never delays a
redraw, and the terminal is given back as it was on `q`, Ctrl-C or SIGTERM. When the daemon does
not answer the view says so and keeps asking. With stdout not a terminal it prints one plain
snapshot, for scripts.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from router.admin import cluster_view
from router.admin.queue_view import age
from router.config import Config
from router.daemon.status_socket import StatusError, query
from router.spool import Spool

REFRESH_SECONDS = 1.0
RATE_WINDOW = 60.0  # deliveries per second are averaged over the samples of the last minute
QUERY_TIMEOUT = 2.0  # a daemon busier than this shows as not answering, and q still works soon
PLAIN_WIDTH = 200  # a snapshot for a script: whole lines, never a queue id wrapped
COUNTERS = ("sent", "deferred", "bounced")
EX_TEMPFAIL = 75  # sysexits, as `qrouter status` when the daemon cannot be reached
# Tables get one rule of ASCII dashes under their header: readable on any terminal and locale
# over ssh, and in a pipe.
RULE = box.Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)


@dataclass
class Snapshot:
    """What one refresh saw. `answer` is the status socket's answer, None when the daemon could
    not be reached (`error` says why); `queues` is Spool.counts(), None when the spool could not
    be read (`queues_error`)."""

    taken: float
    queue_dir: str
    answer: dict[str, Any] | None
    error: str
    queues: dict[str, dict[str, Any]] | None
    queues_error: str


def sample(config: Config) -> Snapshot:
    """Ask the daemon and count the queues; never raises for a daemon or spool that is not there."""
    answer: dict[str, Any] | None
    try:
        answer, error = query(config.socket_path, {"command": "status"}, timeout=QUERY_TIMEOUT), ""
        if "error" in answer:  # the daemon answered, but could not say how it is
            answer, error = None, str(answer["error"])
    except StatusError as exc:
        answer, error = None, str(exc)
    queues: dict[str, dict[str, Any]] | None
    try:
        queues, queues_error = Spool(config.queue_dir).counts(), ""
    except OSError as exc:  # not in the spool group, or the spool is not there yet
        queues, queues_error = None, f"cannot read {config.queue_dir}: {exc.strerror or exc}"
    return Snapshot(time.time(), config.queue_dir, answer, error, queues, queues_error)


class Rates:
    """The daemon's counters (totals since its start) sampled over the last RATE_WINDOW seconds.
    A daemon with another pid started afresh: its counters begin at 0, so the samples of the old
    one are dropped rather than read as a negative rate."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int, dict[str, int]]] = deque()

    def add(self, when: float, pid: int, counters: dict[str, int]) -> None:
        if self.samples and self.samples[-1][1] != pid:
            self.samples.clear()
        self.samples.append((when, pid, counters))
        while self.samples[0][0] < when - RATE_WINDOW:
            self.samples.popleft()

    def per_second(self) -> tuple[dict[str, float], float] | None:
        """Each counter's average rate over the samples kept, and the seconds they span; None
        until there are two samples."""
        if len(self.samples) < 2:
            return None
        (first, _, before), (last, _, after) = self.samples[0], self.samples[-1]
        span = last - first
        return {name: (after.get(name, 0) - before.get(name, 0)) / span for name in COUNTERS}, span


Drawing = Callable[[bool], tuple[RenderableType, bool]]  # live -> the view, and whether its source answered


def node_drawing(config: Config) -> Drawing:
    """The view of this node's daemon, its deliveries per second measured across redraws."""
    rates = Rates()

    def draw(live: bool) -> tuple[RenderableType, bool]:
        started = time.monotonic()
        snapshot = sample(config)
        if snapshot.answer is not None:
            rates.add(started, snapshot.answer["pid"], snapshot.answer["counters"])
        return render(snapshot, rates, live), snapshot.answer is not None

    return draw


def cluster_drawing(url: str) -> Drawing:
    """The view of every node of the cluster whose Redis is `url` (router/admin/cluster_view.py)."""
    def draw(live: bool) -> tuple[RenderableType, bool]:
        view = cluster_view.sample(url)
        return cluster_view.render(view, live), not view.error

    return draw


def run(draw: Drawing) -> int:
    """The view until q or Ctrl-C (exit 0; 1 on a terminal that reports no size); one snapshot if
    stdout is not a terminal (exit 0, or 75 when the daemon cannot be reached, as `qrouter status`)."""
    if not sys.stdout.isatty():
        view, answered = draw(False)
        console = Console(width=PLAIN_WIDTH, color_system=None, force_terminal=False)
        with console.capture() as captured:
            console.print(view)
        print("\n".join(line.rstrip() for line in captured.get().splitlines()))  # no table padding
        return 0 if answered else EX_TEMPFAIL
    return _watch(draw)


def _watch(draw: Drawing) -> int:
    # SIGTERM as Ctrl-C: the `with` blocks below give the terminal back instead of leaving it
    # in the alternate screen without echo.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    console = Console()
    size = _drawable_size()
    try:
        if size is not None:
            with _cbreak() as keys, Live(console=console, screen=True, auto_refresh=False) as live:
                while size is not None:
                    started = time.monotonic()
                    view, _ = draw(True)
                    console.size = size
                    live.update(view, refresh=True)
                    if _quit_asked(keys, started + REFRESH_SECONDS):
                        return 0
                    size = _drawable_size()
    except KeyboardInterrupt:
        return 0
    print("qrouter: the terminal reports its size as 0x0, so nothing can be drawn on it; set it "
          "(e.g. `stty rows 40 cols 120`), or run `qrouter top | cat` for one snapshot", file=sys.stderr)
    return 1


def _drawable_size() -> os.terminal_size | None:
    """The terminal's own size, read again at every redraw: it follows a resized window, and wins
    over COLUMNS and LINES in the environment (which rich would prefer), stale copies of which
    readline exports to the programs it starts. None when the terminal does not know its size (a
    serial line, some ssh clients report 0x0)."""
    size = os.get_terminal_size(sys.stdout.fileno())
    return size if size.columns and size.lines else None


@contextmanager
def _cbreak() -> Iterator[int | None]:
    """stdin in cbreak mode (keys one at a time, not echoed; Ctrl-C still interrupts), restored
    on the way out whatever happens; yields its descriptor, or None when stdin is no terminal
    (then only Ctrl-C quits)."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_asked(keys: int | None, deadline: float) -> bool:
    """Wait until `deadline` (time.monotonic) for keys; True on q, or when the terminal is gone."""
    if keys is None:
        time.sleep(max(0.0, deadline - time.monotonic()))
        return False
    while (left := deadline - time.monotonic()) > 0:
        if select.select([keys], [], [], left)[0]:
            typed = os.read(keys, 1024)
            if not typed or b"q" in typed.lower():
                return True
    return False


def render(snapshot: Snapshot, rates: Rates, live: bool = False) -> RenderableType:
    """The whole view: header, queues, deliveries per second, workers, destinations; `live`
    for the view that is redrawn (and says how to quit), not a one-off snapshot."""
    parts: list[RenderableType] = [_header(snapshot, live), _queues(snapshot)]
    answer = snapshot.answer
    if answer is not None:
        parts += [_rates(answer["counters"], rates), _workers(answer), _destinations(answer["destinations"])]
    return Group(*[item for part in parts for item in (Text(), part)][1:])  # a blank line between parts


def _header(snapshot: Snapshot, live: bool) -> Text:
    clock = time.strftime("%H:%M:%S", time.localtime(snapshot.taken))
    answer = snapshot.answer
    if answer is None:
        text = Text.assemble((f"qrouter: no daemon: {snapshot.error}", "bold red"),
                             " (asking again every second)" if live else "",
                             f"\nspool {snapshot.queue_dir}  {clock}")
    else:
        text = Text(f"qrouter pid {answer['pid']}, up {age(answer['uptime'])}, spool {answer['queue_dir']}  {clock}",
                    style="bold")
    if live:
        text.append("  (q or Ctrl-C quits)", style="dim")
    return text


def _queues(snapshot: Snapshot) -> RenderableType:
    if snapshot.queues is None:
        return Text(snapshot.queues_error, style="red")
    table = Table("queue", *snapshot.queues, box=RULE, show_edge=False, padding=(0, 1))
    for column in table.columns[1:]:
        column.justify = "right"
    table.add_row("messages", *(str(info["messages"]) for info in snapshot.queues.values()))
    table.add_row("oldest", *(age(snapshot.taken - info["oldest"]) if info["oldest"] else "-"
                              for info in snapshot.queues.values()))
    return table


def _rates(counters: dict[str, int], rates: Rates) -> Text:
    totals = "since start: " + ", ".join(f"{counters[name]} {name}" for name in COUNTERS)
    measured = rates.per_second()
    if measured is None:
        return Text(f"deliveries per second: measuring\n{totals}")
    per_second, span = measured
    shown = ", ".join(f"{name} {per_second[name]:.1f}/s" for name in COUNTERS)
    return Text(f"deliveries over the last {span:.0f}s: {shown}\n{totals}")


def _workers(answer: dict[str, Any]) -> Table:
    table = Table(box=RULE, show_edge=False, padding=(0, 1), title_justify="left",
                  title=f"workers: {answer['sessions']} of {answer['max_sessions']} sessions in use")
    for name in ("pid", "kind", "state", "sessions", "oldest message", "for", "done", "rss", "cpu"):
        table.add_column(name, justify="left" if name in ("kind", "state", "oldest message") else "right")
    for worker in answer["workers"]:
        busy = worker["busy_for"]
        table.add_row(str(worker["pid"]), Text(worker["pool"]),
                      Text(worker["state"], style="red" if worker["state"] == "silent" else ""),
                      str(worker["sessions"]), Text(worker["queue_id"] or "-"), age(busy) if busy is not None else "-",
                      str(worker["done"]), f"{worker['rss'] / 2**20:.1f}M" if worker["rss"] else "-",
                      f"{worker['cpu']:.1f}s" if worker["cpu"] is not None else "-")
    return table


def _destinations(destinations: list[dict[str, Any]]) -> RenderableType:
    if not destinations:
        return Text("destinations: none in progress, waiting or failing")
    table = Table(box=RULE, show_edge=False, padding=(0, 1), title="destinations", title_justify="left")
    table.add_column("destination", overflow="fold")
    for name in ("domains", "sessions", "window", "limit", "waiting", "deferred"):
        table.add_column(name, justify="right")
    table.add_column("state")
    table.add_column("last error", overflow="fold")
    for shown in destinations:
        state = Text("dead", style="bold red") if shown["dead"] else Text("ok", style="green")
        table.add_row(Text(shown["destination"]), str(shown["domains"] or ""), str(shown["sessions"]),
                      f"{shown['window']:g}", str(shown["limit"]), str(shown["waiting"]), str(shown["deferred"]),
                      state, Text(shown["last_error"] or ""))
    return table
