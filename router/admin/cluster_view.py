"""`qrouter status --cluster` and `qrouter top --cluster`: every node of a cluster, and the totals.

The nodes publish their status snapshots into the cluster's Redis (router/daemon/cluster_view.py);
this reads them all in one scan and one MGET, from any machine that can reach that Redis: no
node's daemon is asked, so a node that is down shows as what it last said, marked stale once its
snapshot is older than STALE_INTERVALS of the node's `cluster-status-interval`, until its key
expires (GONE_INTERVALS) and it is gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from router.admin.queue_view import age
from router.daemon.cluster_view import GONE_INTERVALS, STALE_INTERVALS, read_snapshots
from router.spool import ACTIVE, DEFERRED, HOLD, INCOMING

QUEUES = (INCOMING, ACTIVE, DEFERRED, HOLD)
COUNTERS = ("sent", "deferred", "bounced")


@dataclass
class ClusterView:
    """What one read of the cluster's Redis found: `nodes` (each a node's snapshot, with `age`,
    seconds since it was published, and `stale`), or `error` when Redis could not be read."""

    taken: float
    nodes: list[dict[str, Any]]
    error: str = ""

    def totals(self) -> dict[str, Any]:
        """Queues (messages summed, the oldest of all), sessions, workers and counters over every node."""
        queues = {}
        for queue in QUEUES:
            counts = [node["queues"][queue] for node in self.nodes if queue in node.get("queues", {})]
            oldest = [count["oldest"] for count in counts if count["oldest"] is not None]
            queues[queue] = {"messages": sum(count["messages"] for count in counts),
                             "oldest": min(oldest) if oldest else None}
        return {"nodes": len(self.nodes), "stale": sum(1 for node in self.nodes if node["stale"]), "queues": queues,
                "sessions": sum(node["sessions"] for node in self.nodes),
                "max_sessions": sum(node["max_sessions"] for node in self.nodes),
                "workers": sum(len(node["workers"]) for node in self.nodes),
                "counters": {name: sum(node["counters"][name] for node in self.nodes) for name in COUNTERS}}

    def as_json(self) -> dict[str, Any]:
        return {"now": self.taken, "nodes": self.nodes, "totals": self.totals()}


def sample(url: str) -> ClusterView:
    """Read every node's snapshot; never raises for a Redis that cannot be reached."""
    now = time.time()
    try:
        snapshots = read_snapshots(url)
    except redis.RedisError as exc:
        return ClusterView(now, [], f"cannot read the cluster's status from Redis: {exc}")
    for snapshot in snapshots:
        snapshot["age"] = round(max(0.0, now - snapshot["published"]), 3)
        snapshot["stale"] = snapshot["age"] > STALE_INTERVALS * snapshot["interval"]
    return ClusterView(now, snapshots)


def _row(view: ClusterView, name: str, state: str, entry: dict[str, Any]) -> list[str]:
    queues = entry.get("queues", {})
    oldest = [queues[q]["oldest"] for q in QUEUES if q in queues and queues[q]["oldest"] is not None]
    drain = entry.get("drain")
    return [name, state, *(str(queues[q]["messages"]) if q in queues else "?" for q in QUEUES),
            age(view.taken - min(oldest)) if oldest else "-", f"{entry['sessions']}/{entry['max_sessions']}",
            str(entry["workers"] if isinstance(entry["workers"], int) else len(entry["workers"])),
            *(str(entry["counters"][name]) for name in COUNTERS),
            f"draining to {drain['to']}, {drain['sent']} sent" if drain else ""]


def _rows(view: ClusterView) -> list[tuple[list[str], bool]]:
    rows = [(_row(view, node["node"], f"stale {age(node['age'])}" if node["stale"] else "ok", node), node["stale"])
            for node in view.nodes]
    rows.append((_row(view, "total", f"{len(view.nodes)} nodes", view.totals()), False))
    return rows


HEADINGS = ["node", "state", *QUEUES, "oldest", "sessions", "workers", *COUNTERS, "drain"]


def as_lines(view: ClusterView) -> list[str]:
    """The view as plain text, for `qrouter status --cluster`."""
    if not view.nodes:
        return ["no node has published its status (is cluster-redis the same on every node?)"]
    rows = [HEADINGS, *(row for row, _ in _rows(view))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADINGS))]
    lines = ["  ".join(cell.ljust(width) if i in (0, 1, len(HEADINGS) - 1) else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]
    return [*lines, f"(stale: {STALE_INTERVALS} snapshots missed; a node is gone after {GONE_INTERVALS} "
                    "(cluster-status-interval); counters are since each node's start)"]


def render(view: ClusterView, live: bool = False) -> RenderableType:
    """The view as a table, for `qrouter top --cluster`."""
    clock = time.strftime("%H:%M:%S", time.localtime(view.taken))
    header = Text(f"qrouter cluster: {len(view.nodes)} nodes  {clock}", style="bold")
    if live:
        header.append("  (q or Ctrl-C quits)", style="dim")
    if view.error:
        return Group(header, Text(view.error, style="bold red"))
    table = Table(*HEADINGS, show_edge=False, padding=(0, 1))
    for column in table.columns[2:-1]:
        column.justify = "right"
    for row, stale in _rows(view):
        table.add_row(*row, style="red" if stale else ("bold" if row[0] == "total" else ""))
    return Group(header, Text(), table)
