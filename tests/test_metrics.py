"""The Prometheus endpoint, scraped over HTTP and read with prometheus-client's own parser, as
Prometheus would read it.

The unit tests drive a Metrics the way the supervisor does (reports, snapshots) on a free
loopback port; the daemon tests count five real deliveries through `--metrics-listen`, and hold
2,000 idle connections to it while measuring the supervisor and the delivery rate.
"""

from __future__ import annotations

import selectors
import signal
import socket
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from router.config import parse_listen
from router.daemon import metrics as metrics_module
from router.daemon.metrics import DELAY_BUCKETS, MAX_CONNECTIONS, OTHER, TOP_DESTINATIONS, Metrics
from router.spool import DEFERRED, INCOMING, QUEUES, Spool
from tests.daemon import Daemon, wait_for
from tests.smtp_servers import free_port

Families = dict[str, list[Sample]]


def scrape(address: str) -> tuple[Families, dict[str, str]]:
    """Samples by family name, and the type of each family."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    families = list(text_string_to_metric_families(text))
    return {f.name: f.samples for f in families}, {f.name: f.type for f in families}


def value(families: Families, name: str, **labels: str) -> float:
    """The one sample called `name` with exactly these labels (a histogram's `le` included)."""
    found = [s.value for samples in families.values() for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def label_values(families: Families, family: str, label: str) -> list[str]:
    return [s.labels[label] for s in families[family]]


@pytest.fixture
def spool(tmp_path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.create()
    return spool


@pytest.fixture
def metrics(spool) -> tuple[Metrics, str]:
    """A started Metrics and the address it serves."""
    address = f"127.0.0.1:{free_port()}"
    metrics = Metrics(address, str(spool.root))
    metrics.start()
    return metrics, address


def status(destinations: list[dict[str, Any]] | None = None, workers: list[dict[str, Any]] | None = None,
           **fields: Any) -> dict[str, Any]:
    """A snapshot shaped like Supervisor.status()."""
    return {"now": time.time(), "sessions": 0, "max_sessions": 100, "destinations": destinations or [],
            "workers": workers or [], **fields}


def destination(name: str, sessions: int = 0, waiting: int = 0, deferred: int = 0, dead: bool = False,
                kept: int = 0, domains: int = 0) -> dict[str, Any]:
    return {"destination": name, "sessions": sessions, "window": 5.0, "limit": 20, "kept": kept, "dead": dead,
            "waiting": waiting, "deferred": deferred, "domains": domains, "last_error": None}


def test_counts_deliveries_reloads_and_corrupt_files(metrics):
    metrics, address = metrics
    families, types = scrape(address)
    for outcome in ("sent", "deferred", "bounced"):  # there from the start, at 0
        assert value(families, "qrouter_deliveries_total", status=outcome) == 0
    metrics.delivered(3, 1, 0, 2.0)
    metrics.delivered(0, 2, 1, 100.0)
    metrics.delivered(2, 0, 0, 7200.0)
    metrics.delivered(1, 0, 0, -5.0)  # the clock stepped back since the message arrived
    metrics.reloaded()
    metrics.reloaded()
    metrics.corrupt()
    families, types = scrape(address)
    assert types["qrouter_deliveries"] == "counter"
    assert value(families, "qrouter_deliveries_total", status="sent") == 6
    assert value(families, "qrouter_deliveries_total", status="deferred") == 3
    assert value(families, "qrouter_deliveries_total", status="bounced") == 1
    assert types["qrouter_delivery_delay_seconds"] == "histogram"
    assert value(families, "qrouter_delivery_delay_seconds_count") == 6
    assert value(families, "qrouter_delivery_delay_seconds_sum") == 3 * 2.0 + 2 * 7200.0
    buckets = {float(s.labels["le"]): s.value for s in families["qrouter_delivery_delay_seconds"]
               if s.name.endswith("_bucket")}
    assert sorted(buckets) == [*map(float, DELAY_BUCKETS), float("inf")]
    assert (buckets[0.1], buckets[5], buckets[3600], buckets[14400], buckets[float("inf")]) == (1, 4, 4, 6, 6)
    assert value(families, "qrouter_reloads_total") == 2
    assert value(families, "qrouter_corrupt_files_total") == 1
    assert types["qrouter_reloads"] == types["qrouter_corrupt_files"] == "counter"


def test_snapshot_gauges_keep_the_destination_labels_bounded(metrics):
    metrics, address = metrics
    families, _ = scrape(address)
    assert "qrouter_sessions" not in families  # nothing to say before the first snapshot
    destinations = [destination(f"mx:d{i}.example", sessions=i % 7, waiting=i, deferred=1, dead=i % 10 == 0,
                                kept=i % 3) for i in range(30)]
    destinations.append(destination("site:mx1.provider.test,mx2.provider.test", sessions=20, kept=5, domains=1000))
    workers = [{"pid": 10 + i, "pool": "network", "rss": 1000 * (i + 1), "cpu": 1.5} for i in range(3)]
    workers.append({"pid": 20, "pool": "network", "rss": None, "cpu": None})  # exited since: psutil found nothing
    metrics.snapshot(status(destinations, workers, sessions=42, max_sessions=100, now=time.time() - 2))
    families, types = scrape(address)

    assert value(families, "qrouter_sessions") == 42
    assert value(families, "qrouter_sessions_max") == 100
    assert 2 <= value(families, "qrouter_status_age_seconds") < 10
    ranked = sorted(destinations, key=lambda d: -(d["sessions"] + d["waiting"]))
    named = {d["destination"] for d in ranked[:TOP_DESTINATIONS]}
    rest = ranked[TOP_DESTINATIONS:]
    for family, key in (("qrouter_destination_sessions", "sessions"),
                        ("qrouter_destination_waiting_messages", "waiting"),
                        ("qrouter_destination_deferred_messages", "deferred"),
                        ("qrouter_destination_idle_connections", "kept"),
                        ("qrouter_destination_domains", "domains")):
        assert types[family] == "gauge"
        labels = label_values(families, family, "destination")
        assert len(labels) == len(set(labels)) == TOP_DESTINATIONS + 1
        assert set(labels) == named | {OTHER}
        assert value(families, family, destination=OTHER) == sum(d[key] for d in rest)
        assert sum(s.value for s in families[family]) == sum(d[key] for d in destinations)
    assert set(label_values(families, "qrouter_destination_dead", "destination")) == named
    for d in ranked[:TOP_DESTINATIONS]:
        assert value(families, "qrouter_destination_dead", destination=d["destination"]) == int(d["dead"])
    assert value(families, "qrouter_destinations_dead") == 3
    site = "site:mx1.provider.test,mx2.provider.test"
    assert value(families, "qrouter_destination_domains", destination=site) == 1000
    assert value(families, "qrouter_destination_limit", destination=site) == 20

    assert value(families, "qrouter_workers", kind="network") == 4
    assert value(families, "qrouter_workers", kind="local") == 0
    assert value(families, "qrouter_workers_resident_memory_bytes", kind="network") == 6000
    assert value(families, "qrouter_workers_cpu_seconds", kind="network") == 4.5
    assert types["qrouter_workers_cpu_seconds"] == "gauge"  # drops when a worker is replaced
    assert "process_resident_memory_bytes" in families  # the supervisor's own

    metrics.snapshot(status([destination("mx:only.example", sessions=1)]))  # a new one replaces it whole
    families, _ = scrape(address)
    assert set(label_values(families, "qrouter_destination_sessions", "destination")) == {"mx:only.example", OTHER}
    assert value(families, "qrouter_destination_sessions", destination=OTHER) == 0
    assert value(families, "qrouter_workers", kind="network") == 0


def test_queue_gauges_are_read_from_the_spool_at_scrape_time(metrics, spool):
    metrics, address = metrics
    families, types = scrape(address)
    assert types["qrouter_queue_messages"] == types["qrouter_queue_oldest_age_seconds"] == "gauge"
    for queue in QUEUES[1:]:  # tmp/ holds files being written, not messages
        assert value(families, "qrouter_queue_messages", queue=queue) == 0
        assert value(families, "qrouter_queue_oldest_age_seconds", queue=queue) == 0
    hour_ago = f"{int((time.time() - 3600) * 1e6):013X}-1-1"  # a queue id says when its message arrived
    old = spool.enqueue("a@example.org", ["u@example.org"], b"x\n", queue_id=hour_ago)
    ids = [spool.enqueue("a@example.org", ["u@example.org"], b"x\n") for _ in range(3)]
    for queue_id in (old, ids[0]):
        assert spool.move(queue_id, INCOMING, DEFERRED, mtime=time.time() + 600)
    (spool.root / DEFERRED / "not-a-queue-file").write_bytes(b"")  # foreign names are no messages
    families, _ = scrape(address)
    assert value(families, "qrouter_queue_messages", queue=DEFERRED) == 2
    assert value(families, "qrouter_queue_messages", queue=INCOMING) == 2
    assert 3600 <= value(families, "qrouter_queue_oldest_age_seconds", queue=DEFERRED) < 3660
    assert 0 <= value(families, "qrouter_queue_oldest_age_seconds", queue=INCOMING) < 60


def test_listens_on_ipv6_in_brackets(spool):
    port = free_port("::1")
    Metrics(f"[::1]:{port}", str(spool.root)).start()
    families, _ = scrape(f"[::1]:{port}")
    assert "qrouter_queue_messages" in families


def test_start_raises_oserror_when_the_port_is_taken(spool):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = Metrics(f"127.0.0.1:{taken.getsockname()[1]}", str(spool.root))
        with pytest.raises(OSError):
            metrics.start()


def test_a_client_gets_connection_seconds_from_connect_to_the_end_of_its_answer(spool, monkeypatch):
    """One that sends half a request and waits is closed at its deadline; scrapes go on."""
    monkeypatch.setattr(metrics_module, "CONNECTION_SECONDS", 0.5)
    address = f"127.0.0.1:{free_port()}"
    Metrics(address, str(spool.root)).start()
    host, port = parse_listen(address)
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=10) as slow:
        slow.sendall(b"GET /metrics HTTP/1.0\r\n")  # and never the empty line that ends it
        assert slow.recv(1024) == b""
        assert 0.5 <= time.monotonic() - start < 5
    families, _ = scrape(address)
    assert "qrouter_queue_messages" in families


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("localhost:65535", ("localhost", 65535)),
    ("[::1]:9100", ("::1", 9100)),
    ("[::]:9100", ("::", 9100)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize(("text", "error"), [
    ("9100", "HOST:PORT"),
    (":9100", "HOST:PORT"),
    ("127.0.0.1:", "HOST:PORT"),
    ("127.0.0.1", "HOST:PORT"),
    ("::1:9100", "in brackets"),
    ("[not-v6]:9100", "IPv6 address between the brackets"),
    ("[127.0.0.1]:9100", "IPv6 address between the brackets"),
    ("host name:9100", "HOST:PORT"),
    ("127.0.0.1:0", "port number from 1 to 65535"),
    ("127.0.0.1:65536", "port number from 1 to 65535"),
    ("127.0.0.1:+80", "port number"),
    ("127.0.0.1:\uff19\uff11", "port number"),  # digits (fullwidth), but not ASCII ones
])
def test_parse_listen_refuses(text, error):
    with pytest.raises(ValueError, match="must") as refused:  # "must": config.py shows the message itself
        parse_listen(text)
    assert error in str(refused.value)


def test_daemon_serves_metrics_of_its_deliveries(daemons):
    port = free_port()
    daemon = daemons("--metrics-listen", f"127.0.0.1:{port}")
    spool = Spool(daemon.spool)
    for i in range(5):
        spool.enqueue("a@example.org", [f"u{i}@example.org"], b"Subject: m\n\nbody\n")
    wait_for(lambda: len(daemon.delivered()) == 5, what="five deliveries")
    daemon.wait_idle()

    def scraped() -> Families | None:  # the counters follow the workers' reports; the gauges a snapshot
        families, _ = scrape(f"127.0.0.1:{port}")
        done = value(families, "qrouter_deliveries_total", status="sent") == 5 and "qrouter_workers" in families
        return families if done else None

    families = wait_for(scraped, what="the metrics of five deliveries")
    assert value(families, "qrouter_delivery_delay_seconds_count") == 5
    assert value(families, "qrouter_deliveries_total", status="deferred") == 0
    assert value(families, "qrouter_deliveries_total", status="bounced") == 0
    assert set(label_values(families, "qrouter_queue_messages", "queue")) == set(QUEUES[1:])
    assert value(families, "qrouter_queue_messages", queue=INCOMING) == 0
    assert value(families, "qrouter_workers", kind="network") >= 1
    assert daemon.stop() == 0


IDLE_CLIENTS = 2000


def connect_idle(stack: ExitStack, port: int, count: int, timeout: float = 20.0) -> list[socket.socket]:
    """Open `count` connections to the port on loopback, all at once, that never send anything;
    kept open until `stack` closes."""
    clients = []
    with selectors.DefaultSelector() as selector:
        for _ in range(count):
            client = stack.enter_context(socket.socket())
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            selector.register(client, selectors.EVENT_WRITE)
            clients.append(client)
        deadline = time.monotonic() + timeout
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(deadline - time.monotonic()):
                selector.unregister(key.fileobj)
                assert key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert not selector.get_map(), f"{len(selector.get_map())} of {count} idle clients could not connect"
    return clients


def closed_by_the_server(clients: list[socket.socket]) -> int:
    """How many of these clients, which never send anything, the server has closed (they see
    the end of the connection)."""
    with selectors.DefaultSelector() as selector:
        for client in clients:
            selector.register(client, selectors.EVENT_READ)
        return len(selector.select(0))


def threads_and_memory(pid: int) -> tuple[int, int]:
    """A process's threads, and its resident memory in bytes, as /proc tells."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) * 1024


def race(daemons: list[Daemon], name: str, count: int = 200) -> list[float]:
    """Seconds each daemon takes to deliver `count` messages, all of them handed to every
    daemon at the same moment: queued while the supervisors are stopped (SIGSTOP), then let go
    together, so that the daemons, not the queueing, set the pace, and whatever else the
    machine does weighs on all of them alike."""
    for daemon in daemons:
        daemon.signal(signal.SIGSTOP)
    try:
        for daemon in daemons:
            spool = Spool(daemon.spool)
            for number in range(count):
                spool.enqueue("a@example.org", [f"{name}-{number}@example.org"], b"Subject: race\n\nx\n")
    finally:
        start = time.monotonic()
        for daemon in daemons:
            daemon.signal(signal.SIGCONT)
    seconds: dict[int, float] = {}
    while len(seconds) < len(daemons):
        for index, daemon in enumerate(daemons):
            if index not in seconds and len(daemon.delivered(f"example.org/{name}-*")) == count:
                seconds[index] = time.monotonic() - start
        assert time.monotonic() - start < 60, f"{name}: not all delivered within 60s"
        time.sleep(0.02)
    return [seconds[index] for index in range(len(daemons))]


def test_idle_connections_hold_neither_threads_nor_memory_nor_scrapes_nor_delivery(daemons, open_files):
    """2,000 clients connect to a daemon's metrics port and send nothing. The supervisor keeps no
    more than MAX_CONNECTIONS of them open (it closes the others), so its threads and memory stay
    bounded, a scrape is answered at once, and it delivers mail as fast as a daemon beside it
    that has no idle clients."""
    open_files(IDLE_CLIENTS + 256)
    calm = daemons("--metrics-listen", f"127.0.0.1:{free_port()}")
    port = free_port()
    busy = daemons("--metrics-listen", f"127.0.0.1:{port}", home="busy")
    supervisor = busy.status()["pid"]
    race([calm, busy], "warm-up")
    threads, memory = threads_and_memory(supervisor)
    with ExitStack() as idle:
        clients = connect_idle(idle, port, IDLE_CLIENTS)
        wait_for(lambda: closed_by_the_server(clients) >= IDLE_CLIENTS - MAX_CONNECTIONS, timeout=10,
                 what=f"all but {MAX_CONNECTIONS} idle clients dropped")
        # a dropped connection's thread ends a moment after its client sees the end
        wait_for(lambda: threads_and_memory(supervisor)[0] <= threads + MAX_CONNECTIONS, timeout=5,
                 what=f"at most {MAX_CONNECTIONS} more threads in the supervisor")
        start = time.monotonic()
        families, _ = scrape(f"127.0.0.1:{port}")
        assert "qrouter_queue_messages" in families and time.monotonic() - start < 5
        rounds = [race([calm, busy], f"round{number}") for number in range(3)]
        grown = threads_and_memory(supervisor)[1] - memory
    assert grown < 16 << 20, f"the supervisor grew by {grown >> 20} MB"
    # The two daemons of a round race side by side, so a round's ratio weighs the machine's other work
    # on both; idle clients that slowed delivery would slow every round, a burst of other work only one.
    # Below 1.25: at least 80% of the rate.
    ratio = min(slow / fast for fast, slow in rounds)
    assert ratio < 1.25, f"with idle clients, delivery took {ratio:.2f} times as long: {rounds}"
