"""One view of a cluster: nodes publish their status into a real redis-server (`cluster-redis`),
`qrouter status --cluster` and `qrouter top --cluster` show every node and the totals, and a node
that stops is shown stale, then is gone. Real daemons with spools of their own, on loopback."""

from __future__ import annotations

import json
import urllib.request

from router.daemon.cluster_view import GONE_INTERVALS, STALE_INTERVALS
from router.spool import Spool
from tests.daemon import qrouter, wait_for
from tests.redis_server import RedisServer
from tests.smtp_servers import free_port

HELD_BACK = ["--default-transport", "queue/retry 4.4.0 held back", "--min-backoff", "3600"]
INTERVAL = 3.0  # cluster-status-interval: a stopped node is stale after 9 s and gone after 18 (room for
# three `qrouter status` runs, a few seconds each under load, while it is stale)
PUBLISHING = ["--cluster-status-interval", str(INTERVAL)]


def cluster(url: str) -> dict:
    result = qrouter("status", "--cluster", "--cluster-redis", url, "--json", check=True)
    return json.loads(result.stdout)


def nodes(url: str) -> dict[str, dict]:
    return {node["node"]: node for node in cluster(url)["nodes"]}


def test_status_cluster_shows_every_node_and_a_stopped_one_stale_then_gone(daemons):
    with RedisServer() as server:
        metrics_port = free_port()
        started = {name: daemons(*HELD_BACK, "--cluster-redis", server.url, "--cluster-node", name, *PUBLISHING,
                                 *(["--metrics-listen", f"127.0.0.1:{metrics_port}"] if name == "node-a" else []),
                                 home=name, workers=1)
                   for name in ("node-a", "node-b", "node-c")}
        spool = Spool(started["node-a"].spool)
        for i in range(3):
            spool.enqueue("s@example.org", [f"u{i}@example.org"], b"Subject: held\r\n\r\nheld\r\n")
        spool.close()
        wait_for(lambda: len(started["node-a"].files("deferred")) == 3, what="node-a's mail deferred")
        wait_for(lambda: (set(found := nodes(server.url)) == set(started)
                          and found["node-a"]["queues"]["deferred"]["messages"] == 3), timeout=30,
                 what="every node in the view, node-a with its deferred mail")

        view = cluster(server.url)
        assert not any(node["stale"] for node in view["nodes"])
        assert view["totals"]["nodes"] == 3 and view["totals"]["queues"]["deferred"]["messages"] == 3
        assert view["totals"]["workers"] == sum(len(node["workers"]) for node in view["nodes"]) >= 3
        text = qrouter("status", "--cluster", "--cluster-redis", server.url, check=True).stdout.decode()
        assert [line.split()[:2] for line in text.splitlines()[1:5]] == [
            ["node-a", "ok"], ["node-b", "ok"], ["node-c", "ok"], ["total", "3"]], text
        top = qrouter("top", "--cluster", "--cluster-redis", server.url, check=True).stdout.decode()
        assert "qrouter cluster: 3 nodes" in top and "node-b" in top and "total" in top, top

        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'qrouter_queue_messages{node="node-a",queue="deferred"} 3.0' in scrape, scrape

        assert started["node-c"].stop() == 0
        found = wait_for(lambda: (seen := nodes(server.url))["node-c"]["stale"] and seen,
                         timeout=STALE_INTERVALS * INTERVAL + 15, what="node-c stale")
        assert not found["node-a"]["stale"] and not found["node-b"]["stale"]
        text = qrouter("status", "--cluster", "--cluster-redis", server.url, check=True).stdout.decode()
        assert any(line.split()[:2] == ["node-c", "stale"] for line in text.splitlines()), text
        wait_for(lambda: "node-c" not in nodes(server.url), timeout=GONE_INTERVALS * INTERVAL + 15,
                 what="node-c gone")
        assert set(nodes(server.url)) == {"node-a", "node-b"}


def test_a_node_without_its_redis_delivers_and_says_so_once(daemons):
    closed = f"redis://127.0.0.1:{free_port()}/0"
    daemon = daemons("--cluster-redis", closed, "--cluster-node", "alone", *PUBLISHING)
    result = qrouter("enqueue", "-f", "a@example.org", "u@example.org", "--queue-dir", str(daemon.spool),
                     stdin=b"Subject: hi\r\n\r\nhi\r\n", check=True)
    assert result.stdout
    wait_for(lambda: daemon.delivered("example.org/u"), what="delivery with Redis away")
    wait_for(lambda: daemon.status()["uptime"] > STALE_INTERVALS * INTERVAL + 2, timeout=60,
             what="several publications missed")
    assert daemon.log().count("cluster view: cannot publish this node's status to redis://127.0.0.1:") == 1
    away = qrouter("status", "--cluster", "--cluster-redis", closed)
    assert away.returncode == 75 and b"cannot read the cluster's status from Redis" in away.stderr, away
