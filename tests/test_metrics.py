"""The Prometheus endpoint, scraped over HTTP and read with prometheus-client's own parser, as
Prometheus would read it.

The unit tests drive a Metrics the way the supervisor does (reports, snapshots) on a free
loopback port; the daemon test counts five real deliveries through `--metrics-listen`.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from router.config import parse_listen
from router.metrics import DELAY_BUCKETS, OTHER, TOP_DESTINATIONS, Metrics
from router.spool import DEFERRED, INCOMING, QUEUES, Spool
from tests.daemon import wait_for
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


def destination(name: str, sessions: int = 0, waiting: int = 0, deferred: int = 0, dead: bool = False
                ) -> dict[str, Any]:
    return {"destination": name, "sessions": sessions, "window": 5.0, "dead": dead, "waiting": waiting,
            "deferred": deferred, "last_error": None}


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
    destinations = [destination(f"mx:d{i}.example", sessions=i % 7, waiting=i, deferred=1, dead=i % 10 == 0)
                    for i in range(30)]
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
                        ("qrouter_destination_deferred_messages", "deferred")):
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
