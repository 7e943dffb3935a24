"""One view of a cluster: each node's status snapshot in the Redis the nodes share (`cluster-redis`).

Every `cluster-status-interval` seconds a thread of the supervisor writes the node's snapshot under
`qrouter:node:NAME` (NAME: `cluster-node`, else `me`) with a time-to-live of GONE_INTERVALS of them: the
status the daemon already hands its metrics once a second (Supervisor.status(): workers,
sessions, destinations, counters, drain), the queue counts and the oldest message of each queue
(counted by this thread from the spool's directories, as `qrouter status` counts them, never by
the supervisor's loop), the node's name, its interval and when it was published. `qrouter status --cluster` and
`qrouter top --cluster` read every node's key (router/admin/cluster_view.py): a snapshot older
than STALE_INTERVALS of its node's intervals is shown as stale (the node stopped, or cannot reach
Redis), and a node that has not published for GONE_INTERVALS is gone from the view when Redis
expires its key. A stopped
node leaves its key to expire: the view shows it stale first, which is what an administrator
needs to see.

Redis is reached from this thread only, with a timeout on every connect and call, so a slow or
dead Redis never holds up the supervisor; what it cannot publish it logs once, and once when it
can again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any

import redis

from router.spool import Spool

KEY_PREFIX = "qrouter:node:"
STALE_INTERVALS = 3  # snapshots missed: the node is not publishing
GONE_INTERVALS = 6  # then it is gone from the view
REDIS_TIMEOUT = 2.0  # seconds for a connect or a call
MAX_DESTINATIONS = 50  # the busiest destinations a snapshot carries; a view of many nodes stays small

log = logging.getLogger("qrouter")


def connect(url: str, timeout: float = REDIS_TIMEOUT) -> redis.Redis:
    """A client for `cluster-redis` (its AUTH, TLS and database as the URL says), every
    connect and call bounded by `timeout` seconds."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=0)


class Publisher:
    """The node's side: offer() from the supervisor's loop, publishing from a thread of its own."""

    def __init__(self, url: str, node: str, queue_dir: str, interval: float) -> None:
        self.url = url
        self.node = node
        self.interval = interval
        self.spool = Spool(queue_dir)
        self.latest: dict[str, Any] | None = None
        self.failing = False

    def offer(self, status: dict[str, Any]) -> None:
        """The supervisor's latest status(), kept by reference: the caller never changes it after."""
        self.latest = status

    def start(self) -> None:
        """Publish from a thread of this process (call it in the supervisor's own process: a
        fork loses the thread). A worker forked later lets go of the connection to Redis (the
        pool forgets it, and the socket closes without a shutdown, which would end the
        supervisor's too)."""
        client = connect(self.url)
        os.register_at_fork(after_in_child=client.connection_pool.reset)
        threading.Thread(target=self._run, args=(client,), name="cluster-view", daemon=True).start()

    def _run(self, client: redis.Redis) -> None:
        while True:
            status = self.latest
            if status is not None:
                self._publish(client, status)
            time.sleep(self.interval)

    def _publish(self, client: redis.Redis, status: dict[str, Any]) -> None:
        try:
            queues = self.spool.counts()
        except OSError as exc:
            queues = {"error": exc.strerror or str(exc)}
        busiest = sorted(status["destinations"], key=lambda d: -(d["sessions"] + d["waiting"] + d["deferred"]))
        snapshot = {**status, "destinations": busiest[:MAX_DESTINATIONS], "queues": queues,
                    "node": self.node, "interval": self.interval, "published": time.time()}
        try:
            client.set(KEY_PREFIX + self.node, json.dumps(snapshot),
                       ex=max(1, math.ceil(GONE_INTERVALS * self.interval)))
        except redis.RedisError as exc:
            if not self.failing:
                log.warning("cluster view: cannot publish this node's status to %s: %s; trying again every %gs",
                            _shown(self.url), exc, self.interval)
            self.failing = True
            return
        if self.failing:
            log.info("cluster view: publishing this node's status to %s again", _shown(self.url))
        self.failing = False


def read_snapshots(url: str) -> list[dict[str, Any]]:
    """Every node's snapshot in the cluster's Redis, by node name; raises redis.RedisError."""
    client = connect(url)
    try:
        keys = sorted(client.scan_iter(match=KEY_PREFIX + "*", count=1000))
        values = client.mget(keys) if keys else []
    finally:
        client.close()
    snapshots = []
    for value in values:
        if value is None:  # expired between the scan and the read
            continue
        try:
            snapshots.append(json.loads(value))
        except ValueError:
            continue
    return sorted(snapshots, key=lambda snapshot: str(snapshot.get("node")))


def _shown(url: str) -> str:
    """The URL without its password, for the log."""
    scheme, _, rest = url.partition("://")
    credentials, at, place = rest.rpartition("@")
    return f"{scheme}://{credentials.partition(':')[0] + '@' if at else ''}{place}"
