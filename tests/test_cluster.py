"""Several nodes that send as one (`cluster-redis`): three real daemons with spools of their own,
one real redis-server, one counting sink. A destination's concurrency and rate hold over the
three together, a destination one finds dead is dead for all until one probe, and a Redis that
dies mid-run costs nothing but sharing: every message still arrives once, each node says so once,
and the shared limits come back with it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from router.spool import Spool
from tests.daemon import ROOT, Daemon, wait_for
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
