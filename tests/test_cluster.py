"""Several nodes that send as one (`cluster-redis`): three real daemons with spools of their own,
one real redis-server, one counting sink. A destination's concurrency and rate hold over the
three together, a destination one finds dead is dead for all until one probe, and a Redis that
dies mid-run costs nothing but sharing: every message still arrives once, each node says so once,
and the shared limits come back with it."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from router.spool import Spool
from tests.daemon import Daemon, qrouter, wait_for
from tests.redis_server import RedisServer
from tests.smtp_servers import CountingSink

MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"
NODES = ("one", "two", "three")


def cluster(daemons, tmp_path: Path, sink: CountingSink, rule: str, redis: RedisServer | None,
            *args: str) -> list[Daemon]:
    """Three daemons routing `d.example` to the sink, its rule in a destinations file they share,
    each with a spool of its own; with `redis`, nodes of one cluster."""
    (tmp_path / "transports").write_text(f"d.example 127.0.0.1:{sink.port}\n")
    (tmp_path / "destinations").write_text(f"smtp:127.0.0.1:{sink.port} {rule}\n")
    shared = ["--cluster-redis", redis.url] if redis else []
    return [daemons("--transports", str(tmp_path / "transports"), "--destinations", str(tmp_path / "destinations"),
                    *shared, "--cluster-node", name, *args, home=name) for name in NODES]


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
        nodes = cluster(daemons, tmp_path, sink, "concurrency=6", None)
        recipients = enqueue(nodes, 900)
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
        in_30s = sum(1 for m in list(sink.messages) if m.at < first + 30)
        assert 270 <= in_30s <= 330, in_30s
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
        declared = sink.connections  # the round that found it dead
        recipients = enqueue(nodes[1:], 20, "later")
        wait_for(lambda: all("found by node one" in node.log() for node in nodes[1:]), 10,
                 "nodes two and three told")
        time.sleep(7.5)  # two probe intervals and a half
        assert sink.connections - declared <= 3, sink.connections - declared  # one probe an interval, all nodes
        sink.accepting = True
        wait_for(lambda: recipients <= set(arrived(sink)), 30, "the mail of nodes two and three")


def status_text(node: Daemon) -> str:
    """`qrouter status` as an administrator runs it."""
    result = qrouter("status", "--queue-dir", str(node.spool), check=True)
    return result.stdout.decode()


def test_redis_killed_mid_run_and_restarted_costs_no_mail_and_the_limits_come_back(daemons, tmp_path):
    """kill -9 of Redis while three nodes deliver: each node says so once (in its log and in
    `status`) and goes on at a third of the limit; every message arrives once; once Redis is back,
    the limit holds over the three again."""
    redis = RedisServer()
    with redis, CountingSink(delay=0.02) as sink:
        nodes = cluster(daemons, tmp_path, sink, "concurrency=6", redis)
        recipients = enqueue(nodes, 600)
        wait_for(lambda: len(sink.messages) >= 100, 60, "the first hundred messages")
        redis.kill()
        wait_for(lambda: all("unreachable" in node.log() for node in nodes), 10, "every node to notice")
        recipients |= enqueue(nodes, 300, "during")
        shown = status_text(nodes[0])
        assert "cluster: node one, redis redis://127.0.0.1:" in shown and "limits divided by 3" in shown, shown
        assert "unreachable since " in shown, shown
        time.sleep(2)
        redis.start()
        wait_for(lambda: all("answers again" in node.log() for node in nodes), 10, "every node to see it back")
        time.sleep(3)  # "within a few seconds": the connections beyond the shared limit are closed
        with sink.lock:
            sink.most = sink.open
        back = sink.most
        recipients |= enqueue(nodes, 600, "after")
        wait_for(lambda: len(sink.messages) >= len(recipients), 120, "every message at the sink")
        time.sleep(0.5)  # none arrives twice
        assert arrived(sink) == Counter(recipients)
        assert sink.most <= 6, (back, sink.most)
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
