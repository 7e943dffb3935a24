"""Several nodes that send as one (`cluster-redis`): three real daemons with spools of their own,
one real redis-server, one counting sink. A destination's concurrency and rate hold over the
three together, a destination one finds dead is dead for all until one probe, and a Redis that
dies mid-run costs nothing but sharing: every message still arrives once, each node says so once,
and the shared limits come back with it."""

from __future__ import annotations

import select
import statistics
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

from router.daemon.cluster import DEMAND_SECONDS, RENEW_SECONDS, Cluster
from router.daemon.dispatcher import Dispatcher, Limits, Routed
from router.daemon.redis_link import key
from router.spool import Spool
from tests.daemon import Daemon, qrouter, wait_for
from tests.redis_server import RedisServer
from tests.smtp_servers import CountingSink

MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"
NODES = ("one", "two", "three")


def cluster(daemons, tmp_path: Path, sink: CountingSink, rule: str, redis: RedisServer | None,
            *args: str, names: tuple[str, ...] = NODES, start: bool = True) -> list[Daemon]:
    """Three daemons (or one per name) routing `d.example` to the sink, its rule in a destinations
    file they share, each with a spool of its own and its name in EHLO (`NAME.example`, as the
    sink counts their connections); with `redis`, nodes of one cluster."""
    (tmp_path / "transports").write_text(f"d.example 127.0.0.1:{sink.port}\n")
    (tmp_path / "destinations").write_text(f"smtp:127.0.0.1:{sink.port} {rule}\n")
    shared = ["--cluster-redis", redis.url] if redis else []
    return [daemons("--transports", str(tmp_path / "transports"), "--destinations", str(tmp_path / "destinations"),
                    *shared, "--cluster-node", name, "--me", f"{name}.example", *args, home=name, start=start)
            for name in names]


def enqueue(nodes: list[Daemon], count: int, prefix: str = "u") -> set[str]:
    """`count` messages spread over the nodes' spools, one recipient each; their recipients."""
    spools = [Spool(node.spool) for node in nodes]
    recipients = {f"{prefix}{i}@d.example" for i in range(count)}
    for i, recipient in enumerate(sorted(recipients)):
        spools[i % len(spools)].enqueue("a@example.org", [recipient], MESSAGE)
    return recipients


def arrived(sink: CountingSink) -> Counter[str]:
    return Counter(recipient for message in list(sink.messages) for recipient in message.rcpt_tos)


def test_a_concurrency_limit_holds_over_three_nodes_and_every_message_arrives_once(daemons, tmp_path):
    """900 messages over three spools, a limit of 6: the sink never sees more than 6 connections."""
    with RedisServer() as redis, CountingSink(delay=0.02) as sink:
        nodes = cluster(daemons, tmp_path, sink, "concurrency=6", redis)
        recipients = enqueue(nodes, 900)
        wait_for(lambda: len(sink.messages) >= 900, 120, "every message at the sink")
        time.sleep(0.5)  # none arrives twice
        assert arrived(sink) == Counter(recipients)
        assert sink.most <= 6, sink.most
        assert sink.most >= 4, sink.most  # the limit is shared, not cut down to a third


def test_without_a_cluster_three_nodes_open_three_times_the_limit(daemons, tmp_path):
    """The same run without cluster-redis: each node keeps its own 6."""
    with CountingSink(delay=0.02) as sink:
        nodes = cluster(daemons, tmp_path, sink, "concurrency=6", None, start=False)
        for node in nodes:
            Spool(node.spool).create()
        recipients = enqueue(nodes, 900)  # before the starts: a window grows only while a line waits
        for node in nodes:
            node.start()
        wait_for(lambda: len(sink.messages) >= 900, 120, "every message at the sink")
        assert arrived(sink) == Counter(recipients)
        assert sink.most > 6, sink.most


def test_a_rate_limit_holds_over_three_nodes(daemons, tmp_path):
    """600/min over three nodes: 10 a second from all of them together, measured over 30 seconds
    (the issue's two minutes, shortened for the suite's time) within 10%."""
    with RedisServer() as redis, CountingSink() as sink:
        nodes = cluster(daemons, tmp_path, sink, "rate=600/min", redis)
        enqueue(nodes, 450)
        wait_for(lambda: sink.messages, 20, "the first message")
        first = sink.messages[0].at
        time.sleep(31)
        arrivals = sorted(m.at for m in list(sink.messages) if m.at < first + 30)
        assert len(arrivals) <= 330, len(arrivals)
        # Not a count from below: a node that stalls loses the tokens it was given. Most starts
        # are a tenth of a second apart, however many stalls there were.
        gap = statistics.median(b - a for a, b in pairwise(arrivals))
        assert 0.09 <= gap <= 0.12, (gap, len(arrivals))
        assert {Path(node.tmp).name for node in nodes if node.status()["counters"]["sent"]} == set(NODES)


def test_a_destination_found_dead_by_one_node_is_dead_for_all_and_probed_by_one(daemons, tmp_path):
    """Node one finds the destination dead; the others, given mail for it afterwards, make no
    attempt of their own: from then on the three together connect once per probe interval. When
    it answers again, all three deliver their mail."""
    with RedisServer() as redis, CountingSink() as sink:
        sink.accepting = False
        nodes = cluster(daemons, tmp_path, sink, "concurrency=6", redis, "--min-backoff", "3")
        for i in range(5):
            Spool(nodes[0].spool).enqueue("a@example.org", [f"round{i}@d.example"], MESSAGE)
        wait_for(lambda: "is not reachable" in nodes[0].log(), 30, "the destination found dead by node one")
        client = redis.client()  # node one tells Redis a request after its log line
        wait_for(lambda: client.exists(key("dead", f"smtp:127.0.0.1:{sink.port}")), 10, "the death told to Redis")
        # the last attempt of the round may connect after the death was told
        nodes[0].wait_idle()
        declared, since = sink.connections, time.monotonic()  # the round that found it dead
        recipients = enqueue(nodes[1:], 20, "later")
        wait_for(lambda: all("found by node one" in node.log() for node in nodes[1:]), 10,
                 "nodes two and three told")
        time.sleep(7.5)  # two probe intervals and a half, or more
        probes = int((time.monotonic() - since) / 3) + 1  # one probe an interval, all nodes together
        assert sink.connections - declared <= probes, (sink.connections - declared, probes)
        sink.accepting = True
        wait_for(lambda: recipients <= set(arrived(sink)), 30, "the mail of nodes two and three")


def exchange(cluster: Cluster, now: float) -> None:
    """One turn of a supervisor's loop with a request due, and its answer taken in."""
    cluster.tick(now)
    assert cluster.out is not None, "no request was due"
    assert select.select([cluster.fds()[0]], [], [], 10)[0], "Redis did not answer"
    cluster.answered(now)


def test_a_destination_found_dead_again_stays_dead_in_redis():
    """The supervisor's side of a cluster with the real dispatcher and Redis, no daemon: the
    round that kills a destination has attempts still out, and one that fails after the death was
    told moves the probe time (found dead again). Redis is told the new time and keeps the
    destination dead for the other nodes; it is not told of a revival."""
    with RedisServer() as redis:
        name = "smtp:127.0.0.1:25"
        routes = {f"m{i}": Routed((name,), "network") for i in range(5)}
        dispatcher = Dispatcher(lambda _: Limits(5, 5), 10, lambda queue, queue_id: routes.get(queue_id))
        cluster = Cluster(redis.url, "one", dispatcher)
        dispatcher.shared = cluster
        client = redis.client()
        try:
            now = time.time()
            exchange(cluster, now)  # the first answer: the node is up
            for queue_id in routes:
                dispatcher.ready("incoming", queue_id)
            assert not dispatcher.dispatch({1: ("network", 10)}, now)[0]  # no lease yet
            exchange(cluster, now + 0.05)
            tasks, _ = dispatcher.dispatch({1: ("network", 10)}, now + 0.05)
            assert len(tasks) == 5
            refused = {name: "connect to 127.0.0.1[127.0.0.1]:25: Connection refused"}
            died = [dead for _, task in tasks[:4]
                    for dead in dispatcher.finished(task.queue_id, refused, now + 0.05)[1]]
            assert [d.name for d in died] == [name]
            exchange(cluster, now + 0.1)
            first = client.get(key("dead", name))
            assert first is not None, "the death was not told"
            dispatcher.finished(tasks[4][1].queue_id, refused, now + 1)  # the last of the round, found dead again
            exchange(cluster, now + 1.1)
            again = client.get(key("dead", name))
            assert again is not None and again != first, (first, again)
        finally:
            cluster.close()


def test_a_node_that_took_the_whole_limit_gives_a_newcomer_its_fair_share(daemons, tmp_path):
    """Node one has a long queue and holds all 4 connections; node two then gets mail for the same
    destination. Within seconds node two has its half, as node one's connections finish their
    messages and close rather than carry its next ones; never more than 4 at once, and every
    message arrives once."""
    with RedisServer() as redis, CountingSink(delay=0.05) as sink:
        one, two = cluster(daemons, tmp_path, sink, "concurrency=4", redis, names=("one", "two"))
        recipients = enqueue([one], 300, "long")
        wait_for(lambda: sink.open_by["one.example"] == 4, 30, "node one holding the whole limit")
        recipients |= enqueue([two], 40, "new")
        wait_for(lambda: sink.most_by["two.example"] >= 1, 10, "node two's first connection")
        wait_for(lambda: sink.most_by["two.example"] >= 2, 10, "node two's fair share, 2 of 4")
        assert any(f"long{i}@d.example" not in arrived(sink) for i in range(300)), "node one was done first"
        wait_for(lambda: len(sink.messages) >= len(recipients), 120, "every message at the sink")
        time.sleep(0.5)  # none arrives twice
        assert arrived(sink) == Counter(recipients)
        assert sink.most <= 4, sink.most
        assert sink.most_by["one.example"] == 4, sink.most_by


def test_mail_deferred_for_many_dead_destinations_costs_redis_only_a_read_per_renewal(daemons, tmp_path):
    """A node holds mail for 200 dead destinations (refused connections) while it delivers 300
    messages to a live one, rate-limited so that it asks Redis for tokens several times a second:
    every message arrives, and Redis is asked of the dead ones' state with the lease renewals
    (every RENEW_SECONDS), not with every request the live destination makes."""
    dead = 200
    with RedisServer() as redis, CountingSink(delay=0.03) as sink:
        routes = [f"d.example 127.0.0.1:{sink.port}"] + [f"dead{i}.example 127.9.9.9:{2000 + i}" for i in range(dead)]
        rules = [f"smtp:127.0.0.1:{sink.port} rate=30/s"] + [f"smtp:127.9.9.9:{2000 + i} initial-window=1"
                                                                 for i in range(dead)]
        (tmp_path / "transports").write_text("\n".join(routes) + "\n")
        (tmp_path / "destinations").write_text("\n".join(rules) + "\n")
        node = daemons("--transports", str(tmp_path / "transports"), "--destinations", str(tmp_path / "destinations"),
                       "--cluster-redis", redis.url, "--cluster-node", "one", "--min-backoff", "3600")
        spool = Spool(node.spool)
        for i in range(dead):
            spool.enqueue("a@example.org", [f"u@dead{i}.example"], MESSAGE)
        wait_for(lambda: node.log().count("is not reachable") == dead and len(node.files("deferred")) == dead, 60,
                 "every dead destination found dead")
        time.sleep(DEMAND_SECONDS + 1)  # until the demand of their last attempt is no more
        client = redis.client()
        client.config_resetstat()
        trips = node.status()["cluster"]["round_trips"]
        began = time.monotonic()
        recipients = enqueue([node], 300)
        wait_for(lambda: recipients <= set(arrived(sink)), 120, "the live destination's mail")
        elapsed = time.monotonic() - began
        trips = node.status()["cluster"]["round_trips"] - trips
        gets = int(client.info("commandstats").get("cmdstat_get", {}).get("calls", 0))
        renewals = elapsed / RENEW_SECONDS + 2
        assert trips > 3 * renewals, f"{trips} requests in {elapsed:.1f}s: too few to tell"
        # two GETs a destination read: its dead record and its prober
        assert gets <= 2 * dead * renewals + 2 * trips, f"{gets} GETs over {trips} requests in {elapsed:.1f}s"
        assert len(node.files("deferred")) == dead


def status_text(node: Daemon) -> str:
    """`qrouter status` as an administrator runs it."""
    result = qrouter("status", "--queue-dir", str(node.spool), check=True)
    return result.stdout.decode()


def test_redis_killed_mid_run_and_restarted_costs_no_mail_and_the_limits_come_back(daemons, tmp_path):
    """kill -9 of Redis while three nodes deliver, each at its fair share: each node says so once
    (in its log and in `status`) and goes on at its third of the limit; every message arrives
    once; the limit holds over the three all along: at the switch, while Redis is away, and while
    the shared limits are rebuilt."""
    redis = RedisServer()
    with redis, CountingSink(delay=0.02) as sink:
        nodes = cluster(daemons, tmp_path, sink, "concurrency=6", redis)
        recipients = enqueue(nodes, 600)
        wait_for(lambda: len(sink.messages) >= 100, 60, "the first hundred messages")
        wait_for(lambda: all(sink.open_by[f"{name}.example"] == 2 for name in NODES), 20, "2 connections a node")
        most = {"before": sink.most}
        redis.kill()
        wait_for(lambda: all("unreachable" in node.log() for node in nodes), 10, "every node to notice")
        most["switch"] = sink.most
        recipients |= enqueue(nodes, 300, "during")
        shown = status_text(nodes[0])
        assert "cluster: node one, redis redis://127.0.0.1:" in shown and "limits divided by 3" in shown, shown
        assert "unreachable since " in shown, shown
        time.sleep(2)
        most["outage"] = sink.most
        redis.start()
        wait_for(lambda: all("answers again" in node.log() for node in nodes), 10, "every node to see it back")
        most["back"] = sink.most
        recipients |= enqueue(nodes, 600, "after")
        wait_for(lambda: len(sink.messages) >= len(recipients), 120, "every message at the sink")
        time.sleep(0.5)  # none arrives twice
        assert arrived(sink) == Counter(recipients)
        most["after"] = sink.most
        assert sink.most <= 6, (most, sink.most_by)  # the most so far at each step: where the limit broke
        for node in nodes:
            assert node.log().count("unreachable") == 1, node.log()
            assert node.log().count("answers again") == 1, node.log()
        assert "redis redis://127.0.0.1:" in status_text(nodes[1]) and "ok, 3 node(s)" in status_text(nodes[1])


def test_cluster_redis_must_be_a_redis_url():
    """A typo in the URL is refused with the key's name, before any daemon starts."""
    refused = qrouter("check-config", "--cluster-redis", "http://127.0.0.1:6379/0")
    assert refused.returncode != 0 and b"cluster-redis" in refused.stderr + refused.stdout, refused
    accepted = qrouter("check-config", "--cluster-redis", "rediss://user:secret@redis.example.net:6380/2",
                       "--default-transport", "queue/error")
    assert accepted.returncode == 0, accepted
