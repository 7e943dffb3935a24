"""Prometheus metrics of the daemon (`metrics-listen`), served from threads of the supervisor.

The supervisor is one single-threaded event loop and its state is never locked, so the scrape
threads must not touch it. The loop hands over what a scrape needs in two ways only: events go
into the library's counters and histogram, which are thread-safe, and its status() dict is
handed over whole about once a second (Metrics.snapshot) and replaced, never changed, so a scrape
that reads the reference once sees one consistent state. Queue sizes are read by the scrape
threads themselves from the spool's directories at scrape time: a large queue costs the loop nothing.

Labels stay bounded whatever the mail: no addresses or queue ids, no worker pids (they change at
every replacement), and only the busiest destinations by name, the rest summed as `other`.

Connections are bounded as the status socket's are (router/daemon/status_socket.py): anyone who can
reach the port can connect, and prometheus-client's own server keeps a thread for every open
connection for as long as the client likes (2,000 idle clients made 2,000 threads). Here at most
MAX_CONNECTIONS are open, a new one drops the oldest (so a scrape gets through however many
clients sit idle), and each has CONNECTION_SECONDS from connect to the end of its answer.
"""

from __future__ import annotations

import os
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric

from policy.verify import RESULTS
from router.config import parse_listen
from router.spool import Spool
from workers.pools import POOLS

TOP_DESTINATIONS = 20  # destinations shown by name; one label value more, "other", sums the rest
OTHER = "other"  # no destination can be called so: a destination always has a colon (policy/next_hop.py)
DELAY_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
STATUSES = ("sent", "deferred", "bounced")
MAX_CONNECTIONS = 16  # open at once; Prometheus scrapes a target over one connection at a time
CONNECTION_SECONDS = 10.0  # from connect to the end of the answer: Prometheus's own scrape timeout
LISTEN_BACKLOG = 1024  # connections the kernel holds until the server accepts them: a SYN it turns
# away is sent again only a second later


class Metrics:
    """The daemon's metrics; every method but start() is called from the supervisor's loop."""

    def __init__(self, listen: str, queue_dir: str, node: str = "") -> None:
        """`listen`: 'HOST:PORT' or '[IPv6]:PORT'. The registry is this object's own, not the
        library's global one, so nothing imported elsewhere can add to what is served. `node`:
        the node's name in a cluster (`cluster-redis`), put on every series as the label `node`,
        so that one Prometheus tells the nodes apart whatever their targets are called."""
        self.listen = parse_listen(listen)
        self.node = node
        self.registry = CollectorRegistry()
        self._deliveries = Counter("qrouter_deliveries", "Recipients by outcome of a delivery attempt (a "
                                   "recipient deferred at three attempts counts three times).", ["status"],
                                   registry=self.registry)
        for status in STATUSES:
            self._deliveries.labels(status)  # present at 0 from the start, so rate() sees the first ones
        self._delay = Histogram("qrouter_delivery_delay_seconds", "Seconds from a message's arrival to the "
                                "delivery of each of its recipients.", buckets=DELAY_BUCKETS, registry=self.registry)
        self._reloads = Counter("qrouter_reloads", "Configuration reloads that took effect.", registry=self.registry)
        self._corrupt = Counter("qrouter_corrupt_files", "Files moved to corrupt/.", registry=self.registry)
        self._verified = Counter("qrouter_recipient_verifications", "Recipient verification requests by verdict "
                                 "(deliverable, refused, temporary).", ["verdict"], registry=self.registry)
        for result in RESULTS:
            self._verified.labels(result)
        self._tls = Counter("qrouter_smtp_tls_sessions", "SMTP and LMTP sessions opened, by TLS level (policy/"
                            "tls_policy.py) and outcome: verified, untrusted, anonymous, plaintext, or failed "
                            "(the level was not met and the session ended before any mail).", ["level", "outcome"],
                            registry=self.registry)
        self._state = _StateCollector(queue_dir)
        self.registry.register(self._state)
        ProcessCollector(registry=self.registry)  # the supervisor's own memory, CPU and descriptors

    def start(self) -> None:
        """Serve scrapes from threads of this process; raises OSError if the address cannot be
        bound. Call it in the supervisor's own process: a fork loses the threads. Workers forked
        later close their copy of the listening socket, or a daemon started after a crash could
        not bind while the old workers finish their deliveries."""
        host, port = self.listen
        server = _Server(host, port, make_wsgi_app(_NodeLabelled(self.registry, self.node) if self.node
                                                   else self.registry))
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        os.register_at_fork(after_in_child=server.server_close)

    def delivered(self, sent: int, deferred: int, bounced: int, delay: float) -> None:
        """One worker report: recipients by outcome, and `delay` seconds since the message's
        arrival, observed once per recipient sent."""
        for status, count in zip(STATUSES, (sent, deferred, bounced), strict=True):
            if count:
                self._deliveries.labels(status).inc(count)
        for _ in range(sent):
            self._delay.observe(max(0.0, delay))  # the arrival is another clock's reading (the queue id)

    def tls_sessions(self, level: str, outcome: str, count: int) -> None:
        """`count` sessions a worker opened at TLS `level` with this `outcome`."""
        self._tls.labels(level, outcome).inc(count)

    def reloaded(self) -> None:
        self._reloads.inc()

    def corrupt(self) -> None:
        """A file was moved to corrupt/."""
        self._corrupt.inc()

    def verified(self, result: str) -> None:
        """A verify request was answered with this verdict (policy/verify.py)."""
        self._verified.labels(result).inc()

    def snapshot(self, status: dict[str, Any]) -> None:
        """The supervisor's status(), kept by reference: the caller must never change it after."""
        self._state.status = status


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """HTTP for the scrapes, a thread per connection, at most MAX_CONNECTIONS of them, each for at
    most CONNECTION_SECONDS. A connection is dropped by shutting its socket down, which wakes its
    thread wherever it waits on the client; the thread then ends and closes it."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, host: str, port: int, app: Any) -> None:
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        super().__init__((host, port), _QuietHandler)
        self.set_app(app)
        self.lock = threading.Lock()
        self.deadlines: dict[socket.socket, float] = {}  # open connections, oldest first

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            if len(self.deadlines) >= MAX_CONNECTIONS:
                self._drop(next(iter(self.deadlines)))
            self.deadlines[request] = time.monotonic() + CONNECTION_SECONDS
        super().process_request(request, client_address)

    def service_actions(self) -> None:
        """Called by serve_forever at least every half second: drop the connections past their deadline."""
        now = time.monotonic()
        with self.lock:
            while self.deadlines and next(iter(self.deadlines.values())) <= now:
                self._drop(next(iter(self.deadlines)))

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.deadlines.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away, or was dropped, is its own business; anything else is a bug."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def _drop(self, sock: socket.socket) -> None:
        del self.deadlines[sock]
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client has gone already
            pass


class _NodeLabelled:
    """A registry's metrics, each sample with the label node="NAME" added: what a scrape of a
    node of a cluster serves (prometheus-client has no labels common to a whole registry)."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.registry = registry
        self.node = node

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            labelled.samples = [sample._replace(labels={**sample.labels, "node": self.node})
                                for sample in metric.samples]
            yield labelled

    def restricted_registry(self, names: Iterable[str]) -> _NodeLabelled:
        """For a scrape that asks for some metrics by name (?name[]=...)."""
        return _NodeLabelled(self.registry.restricted_registry(names), self.node)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape in the daemon's log."""


class _StateCollector:
    """Gauges made at scrape time, in the scrape thread: queue sizes from the spool's directories
    and the rest from the latest snapshot (nothing before the first one)."""

    def __init__(self, queue_dir: str) -> None:
        self.spool = Spool(queue_dir)
        self.status: dict[str, Any] | None = None  # replaced whole by Metrics.snapshot, never changed

    def collect(self) -> Iterator[Metric]:
        yield from _queues(self.spool.counts(), time.time())
        status = self.status  # read once: one scrape shows one state
        if status is not None:
            yield GaugeMetricFamily("qrouter_status_age_seconds", "Seconds since the supervisor last handed over "
                                    "its state; it does about every second, so more means its loop is stuck.",
                                    value=max(0.0, time.time() - status["now"]))
            yield GaugeMetricFamily("qrouter_sessions", "Deliveries in progress.", value=status["sessions"])
            yield GaugeMetricFamily("qrouter_sessions_max", "Deliveries that may be in progress at once.",
                                    value=status["max_sessions"])
            yield from _destinations(status["destinations"])
            yield from _workers(status["workers"])


def _queues(counts: dict[str, dict[str, Any]], now: float) -> Iterator[Metric]:
    messages = GaugeMetricFamily("qrouter_queue_messages", "Messages in each queue directory.", labels=["queue"])
    age = GaugeMetricFamily("qrouter_queue_oldest_age_seconds", "Seconds since the arrival of the oldest message "
                            "in each queue directory; 0 when it is empty.", labels=["queue"])
    for queue, count in counts.items():
        messages.add_metric([queue], count["messages"])
        age.add_metric([queue], 0.0 if count["oldest"] is None else max(0.0, now - count["oldest"]))
    yield from (messages, age)


def _destinations(destinations: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per destination, the TOP_DESTINATIONS busiest by name (sessions and messages waiting for
    room, then messages deferred) and the rest summed as `other`: MX routing makes a destination
    of every domain mail goes to, and each label value is a series Prometheus keeps. Whether a
    destination is dead is shown for those named, and counted over all."""
    ranked = sorted(destinations, key=lambda d: (-(d["sessions"] + d["waiting"]), -d["deferred"], d["destination"]))
    named, rest = ranked[:TOP_DESTINATIONS], ranked[TOP_DESTINATIONS:]
    families = {
        "sessions": GaugeMetricFamily("qrouter_destination_sessions", "Deliveries in progress to a destination.",
                                      labels=["destination"]),
        "waiting": GaugeMetricFamily("qrouter_destination_waiting_messages", "Messages waiting for room in a "
                                     "destination's concurrency window.", labels=["destination"]),
        "deferred": GaugeMetricFamily("qrouter_destination_deferred_messages", "Messages deferred for a "
                                      "destination.", labels=["destination"]),
        "kept": GaugeMetricFamily("qrouter_destination_idle_connections", "Idle connections kept to a "
                                  "destination, over all workers.", labels=["destination"]),
        "domains": GaugeMetricFamily("qrouter_destination_domains", "Domains a site of MX rollup holds (the "
                                     "domains whose MX hosts are the site's); 0 for other destinations.",
                                     labels=["destination"]),
    }
    limit = GaugeMetricFamily("qrouter_destination_limit", "A destination's concurrency limit (the busiest "
                              "destinations only).", labels=["destination"])
    dead = GaugeMetricFamily("qrouter_destination_dead", "1 if a destination is found unreachable and left alone "
                             "until a probe (the busiest destinations only).", labels=["destination"])
    for destination in named:
        for key, family in families.items():
            family.add_metric([destination["destination"]], destination[key])
        dead.add_metric([destination["destination"]], 1 if destination["dead"] else 0)
        limit.add_metric([destination["destination"]], destination["limit"])
    for key, family in families.items():
        family.add_metric([OTHER], sum(destination[key] for destination in rest))
    yield from families.values()
    yield dead
    yield limit
    yield GaugeMetricFamily("qrouter_destinations_dead", "Destinations found unreachable, all of them.",
                            value=sum(1 for destination in destinations if destination["dead"]))


def _workers(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    """Sums by kind of worker rather than series per pid, which would change at every replacement.
    CPU time is a gauge: it is the live workers' time, and drops when one is replaced."""
    count = GaugeMetricFamily("qrouter_workers", "Worker processes.", labels=["kind"])
    memory = GaugeMetricFamily("qrouter_workers_resident_memory_bytes", "Resident memory of the worker processes, "
                               "summed.", labels=["kind"])
    cpu = GaugeMetricFamily("qrouter_workers_cpu_seconds", "CPU time (user and system) of the live worker processes, "
                            "summed; it drops when a worker is replaced.", labels=["kind"])
    for kind in POOLS:
        mine = [worker for worker in workers if worker["pool"] == kind]
        count.add_metric([kind], len(mine))
        memory.add_metric([kind], sum(worker["rss"] or 0 for worker in mine))
        cpu.add_metric([kind], sum(worker["cpu"] or 0 for worker in mine))
    yield from (count, memory, cpu)
