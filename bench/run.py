"""qrouter benchmarks: delivery latency, drain throughput, and footprint with a large deferred queue;
the same latency and throughput through SMTP to a relay host; delivery to next hops at internet
latency, and past a destination that hardly answers.

    bench/run.py                      all of them, once each
    bench/run.py latency drain        a selection
    bench/run.py --repeat 2           each benchmark twice; the summary shows the better and worse run
    bench/run.py smtp-drain --sink-chunking
                                      the SMTP sinks offer CHUNKING, so the router sends BDAT
                                      (smtp-wan runs both ways by itself)
    bench/run.py smtp-drain --baseline ../old
                                      each benchmark with the daemon running this tree's code, then
                                      ../old's (a checkout made with `git worktree add ../old COMMIT`);
                                      the summary shows both and their ratio

With --baseline the daemon (and `qrouter status`) runs from DIR (it is the working directory and
PYTHONPATH of `python -m router`); the benchmark itself, and the queue files it writes, come from
this tree. `policy` runs no daemon and runs from this tree only.

These print figures next to their targets; they are not tests (a shared machine makes them noisy).
Each runs the real daemon (`qrouter run --foreground`) as a subprocess on a spool and Maildirs in a
fresh directory under /tmp, removed afterwards, and stops by itself.

latency  An idle daemon with 2 workers; messages queued one at a time with Spool.enqueue. Per
         message: from enqueue() returning to the message's rename into the Maildir's new/,
         seen through inotify. A message that lands before enqueue() returns (the daemon can
         deliver while enqueue still fsyncs incoming/) counts as 0 ms.
drain    10,000 messages of 4 KB for 100 users queued while the daemon is stopped, then the daemon
         starts with 4 workers: messages/s from process start to the last rename into new/.
         Reference: a plain loop writing the same messages into Maildirs of the same users with
         the same fsyncs (tmp/ file, fsync, rename to new/, fsync new/), one process; half of it
         runs before the daemon and half after.
memory   100,000 small queue files in deferred/, due in an hour. The daemon starts with 4 workers
         while one new message is queued: time from process start to that message's delivery,
         and the supervisor's resident memory (RSS and PSS) right then (before any status request,
         which adds a few MB of its own); then the time of a status request on the socket, and of
         the `qrouter status` command (a new process, which also counts the queue directories).
smtp-drain
         10,000 messages of 4 KB, one recipient each, queued while the daemon is stopped; then the
         daemon starts with 4 workers and `--relayhost` pointing at a lean SMTP sink on loopback
         (bench/smtp_sink.py, 2 processes, no disk): messages/s from process start to the last
         message the sink accepted, how much of that was start-up (launch to the first message
         accepted), and the CPU time (user + system) of the supervisor and all its workers from
         launch to the last message accepted, per message. Reference (the ceiling): the same
         10,000 messages sent to the same sink by a plain pipelining client over 4 connections,
         4 processes (EHLO once; per message MAIL, RCPT, DATA in one write, then the message).
         Second reference (the spool floor, bench/spool_floor.py): the same messages queued in a
         spool of their own, relayed by 4 processes that per message only claim (rename), read,
         send, unlink and log. Half of each reference runs before the daemon and half after. For
         context, Postfix relays about 1,250 already-queued 4 KB messages/s to a loopback sink on
         a 2-core machine like this one.
policy   A transports file of 10,000 rules (domains, wildcards, a few regexes): load time, and
         lookups per second by the daemon's indexed first-match lookup against a linear
         first-match scan over the same rules, measured in the same run (both give the same rules).
smtp-latency
         An idle daemon with 2 workers relaying to the sink; messages queued one at a time with
         Spool.enqueue. Per message: from enqueue() returning to the sink's acceptance of the
         message (its reply to the final dot), timed by the sink with the same monotonic clock.
smtp-wan Delivery at internet latency. 2,000 messages of 4 KB, one recipient each, spread over 10
         destinations (d0.example ... d9.example, sent by a transports file to 10 ports of
         bench/wan_sink.py, no disk), queued while the daemon is stopped; then the daemon starts
         with its default settings: messages/s from process start to the last message accepted.
         The sink sends every reply D after the read that caused it (a pipelined batch costs one
         D, like a round trip), its greeting after D, and its reply to the final dot S later
         still. Four variants: D=50 ms with S=0 and with S=500 ms, each with a sink that does not
         offer CHUNKING (the client sends DATA: two round trips a message) and with one that does
         (BDAT LAST pipelined with the envelope: one). Also per variant: the round trips per
         message as the sink counts them (wan_sink.py: the greeting, and each read it answered;
         connection set-up and QUIT included), the most connections open at once to each
         destination, as the sink saw them, and the peak of the summed PSS (from smaps_rollup;
         shared pages count once) and RSS of the supervisor and all workers, sampled every 0.5 s.
         Reference: Postfix 3.7 with its defaults relaying the same messages to the same sink on
         this machine, measured in an earlier session: about 500 and 140 msg/s (it sends DATA,
         never BDAT), about 180 MB PSS over its ~100 processes; the aim is twice its rate. Then
         the sink (without CHUNKING) is checked: the same messages from memory through the same
         delays by a plain pipelining client over connections enough for 2,000 msg/s (400 at S=0,
         1,200 at S=500: two round trips and S per message), with the sink's own CPU time.
mx-rollup
         MX rollup at internet latency. 2,000 messages of 4 KB, one recipient each, to 1,000
         domains (d0.example ... d999.example) whose MX records, served by the test suite's
         loopback name server (tests/dns_server.py), all name the same two hosts, both 127.0.0.1;
         queued while the daemon is stopped, which then starts with its default settings and
         `--dns-servers` and `--smtp-port` pointing at the name server and at one port of
         bench/wan_sink.py (D=50 ms, S=0). The 1,000 domains are one site: the most connections
         open at once at the sink must stay within the site's limit (destination-concurrency,
         20). Also messages/s from launch to the last message accepted, round trips per message,
         the domains the daemon's status counts in the site, the DNS questions the name server
         answered per message, and the peak PSS of all processes.
slow-destination
         Head-of-line blocking. 500 messages to a destination that answers every command after
         20 s, queued while the daemon is stopped; the daemon starts with its default settings
         and 2 s after its launch 200 messages to a destination that answers at once are queued:
         from the first of them queued to all 200 accepted, and the p50 and p99 of each one's
         enqueue() returning to its acceptance. It gives up 60 s after they were queued (shown as
         a timeout), then stops the sink, so deliveries stuck in a 20 s wait fail at once, and
         the daemon.
cluster  Three nodes sending as one (cluster-redis): 1,500 messages of 4 KB, one recipient each,
         for one destination at internet latency (bench/wan_sink.py, D=50 ms, S=0) whose rule in
         a destinations file says concurrency=20. First one node alone with all 1,500 in its
         spool (no Redis), the same-run reference; then three nodes with 500 each in spools of
         their own and one redis-server (the test suite's, tests/redis_server.py), started
         together: msg/s from the first launch to the last message accepted, the most connections
         open at once at the sink (the shared limit, 20), and the Redis round trips per message
         (the exchanges every node's status counts). Then the three again with Redis killed
         (kill -9) once a third of the mail is accepted and not restarted: what an outage costs
         (each node goes on at a third of the limit). Last the three with Redis and a dead backlog,
         as a relay holds one: each node starts with one message for each of 1,000 dead
         destinations of its own (domains that a transports file sends to ports of 127.9.9.9,
         where nobody listens, so the connection is refused; `initial-window=1`, so one refusal
         makes a destination dead; `min-backoff` an hour, so none is probed for a minute, longer
         than the run) and, once all are found dead, deferred, and their demand told to Redis has
         lapsed (DEMAND_SECONDS), its 500 are queued into its running spool: msg/s to the live
         destination from the first message accepted to the last (as a ratio to the same of the
         three nodes without the backlog above, the same-run reference), and the Redis round
         trips and GET commands (INFO commandstats, reset before) per message from the first
         queued, beside those of the run without the backlog (counted from its launch).
deferred-200k
         memory with 200,000 queue files in deferred/ and the daemon's default workers.
verify   Recipient verification, policy-only verdicts: an idle daemon with 2 workers, local
         delivery through an aliases file of 1,000 entries (and a regex), a transports file
         with a queue/error rule. VERIFY_REQUESTS `verify` requests on the status socket, one at
         a time, from a client in this process (as a front door asks at RCPT), by turns for a
         known alias, an unknown local user (5.1.1) and the queue/error rule: per request, from
         connect to the answer read. Also the `qrouter verify` command (a new process) once,
         for context.
queue-ops
         The queue commands on 200,000 messages in deferred/ (one in 20 for flush.example):
         `qrouter queue list --queue deferred` to its first line and to its end, `qrouter
         status`, and `qrouter queue flush --to-domain flush.example` (10,000 messages, retried
         at once) while new mail keeps coming: the enqueue-to-Maildir latency of that mail,
         measured as in `latency`, during the flush and the retries it causes (target p99 under
         100 ms).
"""

from __future__ import annotations

import argparse
import compileall
import functools
import math
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import psutil
from inotify_simple import INotify
from inotify_simple import flags as inotify_flags
from policy_lookup import bench_policy
from postfix import PrivatePostfix
from smtp_sink import Session, Sink, blast, wire_message
from spool_floor import relay_spool
from wan_sink import Delay, WanSink, push

from router.daemon.cluster import DEMAND_SECONDS
from router.daemon.status_socket import StatusError, query
from router.spool import DEFERRED, Spool
from router.spool.queue_file import QueueFile, Recipient
from router.spool.queue_id import arrival_of, new_queue_id

ROOT = Path(__file__).resolve().parent.parent
SENDER = "bench@example.org"
DOMAIN = "example.org"
MESSAGE_SIZE = 4096
DAEMON_USER = "qrouter"  # what a daemon started as root becomes (the user key's default)

LATENCY_MESSAGES = 300
LATENCY_WARMUP = 10
LATENCY_WORKERS = 2
LATENCY_PAUSE = 0.005  # lets the worker report back, so every message meets an idle daemon

DRAIN_MESSAGES = 10_000
DRAIN_USERS = 100
DRAIN_WORKERS = 4

MEMORY_DEFERRED = 100_000
MEMORY_WORKERS = 4

SMTP_MESSAGES = 10_000
SMTP_WORKERS = 4
SMTP_CONNECTIONS = 4  # of the ceiling client, one process each
SINK_PROCESSES = 2
POSTFIX_RATE = 1250.0  # msg/s, Postfix relaying queued 4 KB messages to a loopback sink, 2 cores

WAN_DESTINATIONS = 10
WAN_MESSAGES = 2_000
WAN_DELAYS = {"s0": Delay(0.050), "s500": Delay(0.050, 0.500)}  # D and S, by the name their figures start with
# msg/s with the same messages, sink and delays: Postfix 3.7 with its defaults (it sends DATA, never BDAT),
# measured in an earlier session on this machine
# each delay twice, with a sink that offers CHUNKING and without: figure prefix -> (D and S, its name, CHUNKING)
WAN_VARIANTS = {f"{name}{suffix}": (delay, name, chunking) for name, delay in WAN_DELAYS.items()
                for suffix, chunking in (("", False), ("_bdat", True))}
WAN_PSS_TARGET_MB = 150
WAN_CONCURRENCY = 20  # destination-concurrency, by default: connections to one destination
WAN_CHECK_RATE = 2000.0  # msg/s the client that checks the sink could reach if the sink kept up
WAN_TIMEOUT = 600.0
MEMORY_INTERVAL = 0.5  # seconds between samples of the daemon's memory

ROLLUP_DOMAINS = 1_000
ROLLUP_MESSAGES = 2_000
ROLLUP_ORIGIN = "example."  # the zone of the domains d0.example ...
ROLLUP_HOSTS = ("mx1.provider.example", "mx2.provider.example")  # every domain's two MX hosts: one site
ROLLUP_DELAY = Delay(0.050)
ROLLUP_LIMIT = 20  # the site's: destination-concurrency, by default

SLOW_MESSAGES = 500
FAST_MESSAGES = 200
SLOW, FAST = Delay(20.0), Delay(0.0)
FAST_AFTER = 2.0  # seconds from the daemon's launch to queueing the fast messages
FAST_TIMEOUT = 60.0

CLUSTER_NODES = ("one", "two", "three")
CLUSTER_MESSAGES = 1_500
CLUSTER_LIMIT = 20  # the destination's concurrency, over all nodes together
CLUSTER_DELAY = Delay(0.050)
CLUSTER_DEAD = 1_000  # in the dead-backlog run: dead destinations of each node's own, one message each
DEAD_HOST = "127.9.9.9"  # a loopback address nobody listens on: every connection to it is refused at once
DEAD_PORT = 20_000  # the first of the dead destinations' ports
DEAD_BACKOFF = "3600"  # min-backoff in that run: no probe of a dead destination comes during it

DEFERRED_200K = 200_000
FLUSHED = 10_000  # of the 200,000 in queue-ops, those for FLUSH_DOMAIN
FLUSH_DOMAIN = "flush.example"

VERIFY_REQUESTS = 3_000
VERIFY_WARMUP = 30
VERIFY_ALIASES = 1_000

DELIVERY_TIMEOUT = 10.0
DRAIN_TIMEOUT = 150.0


# -- helpers --------------------------------------------------------------------------------


def message(index: int, size: int = MESSAGE_SIZE) -> bytes:
    """A plausible mail of exactly `size` bytes."""
    head = (f"From: <{SENDER}>\nTo: <user{index}@{DOMAIN}>\nSubject: bench message {index}\n"
            f"Message-ID: <{index}.bench@{DOMAIN}>\n\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .\n"
    body = line * (size // len(line) + 1)
    return head + body[:size - len(head)]


def make_maildir(path: Path) -> Path:
    """Create a Maildir as a mail system provisions its users, for the user that delivers into it
    (a daemon started as root runs as its user, qrouter); returns its new/ directory."""
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for made in (path / sub, *path.parents):
                if made == path.parents[-1] or made.owner() == DAEMON_USER or made.parent == Path("/tmp"):
                    break
                shutil.chown(made, DAEMON_USER)
    return path / "new"


@contextmanager
def workspace(name: str, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"qrouter-bench-{name}-", dir="/tmp"))
    path.chmod(0o1777)  # a daemon started as root runs as qrouter and writes its spool and Maildirs here
    try:
        yield path
    finally:
        if keep:
            print(f"  kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def from_checkout(code: Path) -> dict[str, Any]:
    """Popen arguments under which `python -m router` imports router/, workers/ and policy/ from
    the checkout `code`: it is both the working directory and PYTHONPATH (the virtualenv's
    editable install finds its own checkout only after the path)."""
    return {"cwd": code, "env": {**os.environ, "PYTHONPATH": str(code)}}


def qrouter(*args: str) -> tuple[list[str], dict[str, Any]]:
    """The command line and Popen arguments that run `python -m router ARGS` with the code of
    the checkout in Daemon.code."""
    return [sys.executable, "-m", "router", *args], from_checkout(Daemon.code)


def check_checkout(code: Path) -> str | None:
    """Why the daemon could not run the code of the checkout `code`, or None if it can."""
    probe = "import policy, router, workers; print(*(m.__file__ for m in (policy, router, workers)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, **from_checkout(code))
    if done.returncode != 0:
        return f"{code}: cannot import router, workers and policy from it: {done.stderr.strip()[-500:]}"
    strays = [path for path in done.stdout.split() if not Path(path).resolve().is_relative_to(code)]
    return f"{code}: the daemon would import {', '.join(strays)} instead" if strays else None


def compile_checkout(code: Path) -> None:
    """Compile the daemon's modules in the checkout `code` to bytecode, as installing a package
    does. The daemon runs as its own user, which cannot write the checkout's __pycache__: without
    this each launch compiles them again, and the start-up in every figure would include it."""
    for package in ("policy", "router", "workers"):
        compileall.compile_dir(code / package, quiet=1)


class Daemon:
    """`qrouter run --foreground` in a subprocess, logging into a file in the workspace."""

    code: ClassVar[Path] = ROOT  # whose code the daemon runs; main() points it at --baseline DIR

    def __init__(self, root: Path, workers: int | None, routing: Sequence[str] = ()):
        """`workers`: None leaves the daemon's default. `routing`: the flags that say where mail
        goes; by default into Maildirs under mail/."""
        self.spool = root / "spool"
        self.mail = root / "mail"
        self.log_path = root / "qrouter.log"
        self.workers = workers
        self.routing = list(routing) or ["--default-transport", f"queue/maildir {self.mail}/%d/%u"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Launch the daemon; returns the perf_counter() reading just before the launch."""
        workers = [] if self.workers is None else ["--workers", str(self.workers)]
        command, where = qrouter("run", "--foreground", "--queue-dir", str(self.spool), *workers, *self.routing)
        with open(self.log_path, "ab") as log:
            started = time.perf_counter()
            self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, **where)
        return started

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"the daemon exited early; its log:\n{self.log()[-3000:]}")

    def status(self) -> dict[str, Any]:
        return query(os.path.join(self.spool, "status.sock"), {"command": "status"})

    def wait_serving(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until all workers are forked ("started:" logged) and the status socket answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if "started:" in self.log():
                try:
                    return self.status()
                except StatusError:
                    pass
            time.sleep(0.01)
        raise RuntimeError(f"the daemon did not start within {timeout:.0f}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def problems(self) -> list[str]:
        """Log lines that say something went wrong."""
        return [line for line in self.log().splitlines()
                if "error:" in line or "fatal:" in line or "Traceback" in line]

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, as an init system stops it; SIGKILL if it overstays `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wait_for_renames(inotify: INotify, count: int, timeout: float, daemon: Daemon) -> float:
    """Block until `count` files have been renamed into the watched new/ directories; returns the
    perf_counter() reading when the last one was seen."""
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < count:
        events = inotify.read(timeout=200)
        now = time.perf_counter()
        seen += sum(1 for event in events if event.mask & inotify_flags.MOVED_TO)
        if seen >= count:
            return now
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {seen} of {count} deliveries after {timeout:.0f}s")
        if not events:
            daemon.check_alive()
    return time.perf_counter()  # count was 0


def count_files(directories: list[Path]) -> int:
    return sum(len(os.listdir(d)) for d in directories)


def report_problems(daemon: Daemon) -> list[str]:
    problems = daemon.problems()
    for line in problems[:5]:
        print(f"  daemon log: {line}")
    if len(problems) > 5:
        print(f"  daemon log: ... {len(problems) - 5} more problem lines")
    return problems


def memory_of(pid: int) -> tuple[int, int]:
    """PSS and RSS of a process, in bytes, from /proc/PID/smaps_rollup. PSS charges a page that n
    processes share 1/n to each, so PSS adds up across processes to what they really take; forked
    workers share most of their pages with the supervisor, which a sum of RSS counts again in each."""
    sizes = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss"):
                sizes[key] = int(rest.split()[0]) * 1024
    return sizes["Pss"], sizes["Rss"]


class MemorySampler:
    """Samples the PSS and RSS of a process and all its descendants, summed, every `interval`
    seconds in a thread, and keeps the peaks (a daemon's workers come and go; the sum of one
    moment is what the machine has to hold)."""

    def __init__(self, pid: int, interval: float = MEMORY_INTERVAL):
        self.pid = pid
        self.interval = interval
        self.peak_pss = self.peak_rss = self.peak_processes = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        try:
            supervisor = psutil.Process(self.pid)
            pids = [self.pid, *(child.pid for child in supervisor.children(recursive=True))]
        except psutil.Error:
            return
        pss = rss = processes = 0
        for pid in pids:
            try:
                one_pss, one_rss = memory_of(pid)
            except (OSError, KeyError):  # it exited meanwhile
                continue
            pss, rss, processes = pss + one_pss, rss + one_rss, processes + 1
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        self.peak_processes = max(self.peak_processes, processes)
        self.samples += 1


# -- the benchmarks -------------------------------------------------------------------------


def measure_latency(spool: Spool, arrival: Callable[[int], float], where: str) -> dict[str, float]:
    """Queue messages one at a time; `arrival(index)` waits for one to land and says when (the
    perf_counter clock). Prints and returns the percentiles."""
    body = message(0)
    latencies: list[float] = []  # from enqueue() returning, the figure with a target
    totals: list[float] = []  # from enqueue() being called, for context
    early = 0
    for index in range(LATENCY_WARMUP + LATENCY_MESSAGES):
        called = time.perf_counter()
        spool.enqueue(SENDER, [f"user@{DOMAIN}"], body)
        queued = time.perf_counter()
        arrived = arrival(index)
        if index >= LATENCY_WARMUP:
            early += arrived - queued < 0.0001
            latencies.append(max(0.0, arrived - queued) * 1000)
            totals.append((arrived - called) * 1000)
        time.sleep(LATENCY_PAUSE)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    total_cuts = statistics.quantiles(totals, n=100, method="inclusive")
    figures = {"p50_ms": cuts[49], "p99_ms": cuts[98], "max_ms": max(latencies),
               "total_p50_ms": total_cuts[49], "total_p99_ms": total_cuts[98]}
    print(f"  {len(latencies)} messages, from enqueue() returning to {where}: p50 {figures['p50_ms']:.2f} ms, "
          f"p99 {figures['p99_ms']:.2f} ms, max {figures['max_ms']:.2f} ms ({early} there already)")
    print(f"  from enqueue() being called: p50 {figures['total_p50_ms']:.2f} ms, p99 {figures['total_p99_ms']:.2f} ms")
    return figures


def bench_latency(keep: bool) -> dict[str, float]:
    with workspace("latency", keep) as root:
        daemon = Daemon(root, LATENCY_WORKERS)
        spool = Spool(daemon.spool)
        spool.create()
        new_dir = make_maildir(daemon.mail / DOMAIN / "user")
        inotify = INotify()
        inotify.add_watch(new_dir, inotify_flags.MOVED_TO)
        with daemon:
            daemon.start()
            daemon.wait_serving()
            figures = measure_latency(
                spool, lambda index: wait_for_renames(inotify, 1, DELIVERY_TIMEOUT, daemon), "the Maildir")
            idle_rss = psutil.Process(daemon.pid).memory_info().rss
            report_problems(daemon)
        spool.close()
        inotify.close()
    print(f"  supervisor RSS with an empty spool: {idle_rss / 2**20:.1f} MB")
    return figures


def bench_verify(keep: bool) -> dict[str, float]:
    with workspace("verify", keep) as root:
        aliases = root / "aliases"
        aliases.write_text("root nobody\nuser[0-9]+x nobody\n" + "".join(f"alias{i} nobody\n"
                                                                        for i in range(VERIFY_ALIASES)))
        transports = root / "transports"
        transports.write_text("local.example /bin/true\n"
                              "blocked.example queue/error 5.7.1 no mail for blocked.example\n")
        daemon = Daemon(root, LATENCY_WORKERS, ["--aliases", str(aliases), "--transports", str(transports)])
        asked = [f"alias{VERIFY_ALIASES - 1}@local.example", "stranger@local.example", "anyone@blocked.example"]
        expected = {"deliverable", "refused"}
        socket_path = str(daemon.spool / "status.sock")
        with daemon:
            daemon.start()
            daemon.wait_serving()
            times: list[float] = []
            for index in range(VERIFY_WARMUP + VERIFY_REQUESTS):
                started = time.perf_counter()
                answer = query(socket_path, {"command": "verify", "recipient": asked[index % len(asked)]})
                took = time.perf_counter() - started
                if answer.get("verdict") not in expected:
                    raise RuntimeError(f"unexpected answer {answer}")
                if index >= VERIFY_WARMUP:
                    times.append(took * 1000)
            command, where = qrouter("verify", "--queue-dir", str(daemon.spool), asked[1])
            started = time.perf_counter()
            subprocess.run(command, capture_output=True, **where)
            command_s = time.perf_counter() - started
            report_problems(daemon)
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    figures = {"p50_ms": cuts[49], "p99_ms": cuts[98], "max_ms": max(times), "command_s": command_s}
    print(f"  {len(times)} verify requests: p50 {figures['p50_ms']:.3f} ms, p99 {figures['p99_ms']:.3f} ms, "
          f"max {figures['max_ms']:.2f} ms; `qrouter verify` command {command_s:.2f} s")
    return figures


def drain_reference(root: Path, bodies: list[bytes], first: int) -> float:
    """Seconds a plain loop takes to do a Maildir delivery's system calls for `bodies` and nothing
    else; message i (counting from `first`) goes to the Maildir of user i % DRAIN_USERS."""
    maildirs = [make_maildir(root / DOMAIN / f"user{user}").parent for user in range(DRAIN_USERS)]
    started = time.perf_counter()
    for index, body in enumerate(bodies, first):
        maildir = maildirs[index % DRAIN_USERS]
        name = f"{index}.bench"
        staged = os.path.join(maildir, "tmp", name)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(staged, os.path.join(maildir, "new", name))
        dir_fd = os.open(os.path.join(maildir, "new"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return time.perf_counter() - started


def bench_drain(keep: bool) -> dict[str, float]:
    """The reference loop runs half its messages before the daemon and half after, so a change in
    the machine's load during the run weighs on both sides of the ratio alike."""
    with workspace("drain", keep) as root:
        daemon = Daemon(root, DRAIN_WORKERS)
        spool = Spool(daemon.spool)
        spool.create()
        bodies = [message(index) for index in range(DRAIN_MESSAGES)]
        setup = time.perf_counter()
        for index, body in enumerate(bodies):
            spool.enqueue(SENDER, [f"user{index % DRAIN_USERS}@{DOMAIN}"], body)
        spool.close()
        print(f"  queued {DRAIN_MESSAGES} messages with Spool.enqueue in {time.perf_counter() - setup:.1f}s")
        half = DRAIN_MESSAGES // 2
        reference_seconds = drain_reference(root / "reference", bodies[:half], 0)
        new_dirs = [make_maildir(daemon.mail / DOMAIN / f"user{user}") for user in range(DRAIN_USERS)]
        inotify = INotify()
        for new_dir in new_dirs:
            inotify.add_watch(new_dir, inotify_flags.MOVED_TO)
        with daemon:
            started = daemon.start()
            finished = wait_for_renames(inotify, DRAIN_MESSAGES, DRAIN_TIMEOUT, daemon)
            cpu = psutil.Process(daemon.pid).cpu_times()
            report_problems(daemon)
        inotify.close()
        reference_seconds += drain_reference(root / "reference", bodies[half:], half)
        delivered = count_files(new_dirs)
        if delivered != DRAIN_MESSAGES:
            raise RuntimeError(f"{delivered} messages in the Maildirs, expected {DRAIN_MESSAGES}")
        if count_files([root / "reference" / DOMAIN / f"user{user}" / "new" for user in range(DRAIN_USERS)]) \
                != DRAIN_MESSAGES:
            raise RuntimeError("the reference loop lost messages")
    router_rate = DRAIN_MESSAGES / (finished - started)
    reference_rate = DRAIN_MESSAGES / reference_seconds
    ratio = router_rate / reference_rate
    print(f"  router: {DRAIN_MESSAGES} delivered in {finished - started:.2f}s = {router_rate:.0f} msg/s "
          f"(supervisor cpu {cpu.user + cpu.system:.2f}s)")
    print(f"  reference loop: {DRAIN_MESSAGES} in {reference_seconds:.2f}s = {reference_rate:.0f} msg/s")
    print(f"  ratio router/reference: {ratio:.2f}")
    return {"router_rate": router_rate, "reference_rate": reference_rate, "ratio": ratio}


def fill_deferred(spool: Spool, count: int, due: float, domain: Callable[[int], str] = lambda index: DOMAIN) -> None:
    """Write small valid queue files straight into deferred/; no fsync, this is only setup."""
    directory = spool.path(DEFERRED)
    body = b"Subject: waiting\n\nfor a retry\n"
    owner = None  # as root, the spool the daemon's user has had all along (not one it takes over at start)
    if os.geteuid() == 0:
        owner = pwd.getpwnam(DAEMON_USER).pw_uid
        for path in (spool.root, *(spool.path(queue) for queue in os.listdir(spool.root))):
            os.chown(path, owner, -1)
    for index in range(count):
        queue_id = new_queue_id()
        queue_file = QueueFile(queue_id, arrival_of(queue_id), SENDER,
                               [Recipient(f"later{index % 1000}@{domain(index)}")], body, attempts=1)
        fd = os.open(os.path.join(directory, queue_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if owner is not None:
                os.fchown(fd, owner, -1)
            os.write(fd, queue_file.to_bytes())
            os.utime(fd, (due, due))
        finally:
            os.close(fd)


def bench_queue_ops(keep: bool) -> dict[str, float]:
    with workspace("queue-ops", keep) as root:
        daemon = Daemon(root, LATENCY_WORKERS)
        spool = Spool(daemon.spool)
        spool.create()
        fill_deferred(spool, DEFERRED_200K, time.time() + 3600,
                      lambda index: FLUSH_DOMAIN if index % (DEFERRED_200K // FLUSHED) == 0 else DOMAIN)
        new_dir = make_maildir(daemon.mail / DOMAIN / "user")
        inotify = INotify()
        inotify.add_watch(new_dir, inotify_flags.MOVED_TO)
        with daemon:
            daemon.start()
            daemon.wait_serving(timeout=60)
            command, where = qrouter("queue", "list", "--queue", "deferred", "--queue-dir", str(daemon.spool))
            started = time.perf_counter()
            lister = subprocess.Popen(command, stdout=subprocess.PIPE, **where)
            assert lister.stdout is not None
            lister.stdout.readline()
            first = time.perf_counter() - started
            listed = lister.stdout.read().splitlines()[-1].decode()
            lister.wait()
            whole = time.perf_counter() - started
            command, where = qrouter("status", "--queue-dir", str(daemon.spool))
            started = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True, **where)
            status_seconds = time.perf_counter() - started
            command, where = qrouter("queue", "list", "--json", "--to-domain", FLUSH_DOMAIN, "--queue-dir",
                                     str(daemon.spool))
            started = time.perf_counter()
            chosen = subprocess.run(command, capture_output=True, check=True, **where).stdout.splitlines()
            select_seconds = time.perf_counter() - started
            ids = [line.split(b'"queue_id": "', 1)[1].split(b'"', 1)[0].decode() for line in chosen]
            # the ids on the command line, so that the flush reaches the daemon as the new mail starts
            command, where = qrouter("queue", "flush", *ids, "--queue-dir", str(daemon.spool))
            flush = subprocess.Popen(command, stdout=subprocess.DEVNULL, **where)
            figures = measure_latency(
                spool, lambda index: wait_for_renames(inotify, 1, DELIVERY_TIMEOUT, daemon),
                "the Maildir during the flush of 10,000 and their retries")
            if flush.wait(120) != 0:
                raise RuntimeError("qrouter queue flush failed")
            report_problems(daemon)
        spool.close()
        inotify.close()
    print(f"  queue list of 200,000: first line after {first:.2f}s, all after {whole:.1f}s ({listed}); "
          f"qrouter status {status_seconds:.2f}s; choosing the {len(ids)} of {FLUSH_DOMAIN} took {select_seconds:.1f}s")
    return {"list_first_s": first, "list_all_s": whole, "status_s": status_seconds,
            "flush_p99_ms": figures["p99_ms"], "flush_p50_ms": figures["p50_ms"]}


def peak_rss(pid: int) -> int:
    """The process's high-water resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_memory(keep: bool, deferred: int = MEMORY_DEFERRED, workers: int | None = MEMORY_WORKERS,
                 name: str = "memory") -> dict[str, float]:
    """`memory`, and with other arguments `deferred-200k` (twice the messages, default workers)."""
    with workspace(name, keep) as root:
        daemon = Daemon(root, workers)
        spool = Spool(daemon.spool)
        spool.create()
        setup = time.perf_counter()
        fill_deferred(spool, deferred, time.time() + 3600)
        print(f"  wrote {deferred} queue files into deferred/ in {time.perf_counter() - setup:.1f}s")
        new_dir = make_maildir(daemon.mail / DOMAIN / "first")
        inotify = INotify()
        inotify.add_watch(new_dir, inotify_flags.MOVED_TO)
        with daemon:
            started = daemon.start()
            spool.enqueue(SENDER, [f"first@{DOMAIN}"], message(0))
            delivered = wait_for_renames(inotify, 1, DRAIN_TIMEOUT, daemon)
            pss, rss = memory_of(daemon.pid)  # before a status request adds its own
            daemon.wait_serving()
            asked = time.perf_counter()
            status = daemon.status()
            answered = time.perf_counter()
            command, where = qrouter("status", "--queue-dir", str(daemon.spool))
            shown = subprocess.run(command, capture_output=True, text=True, timeout=60, **where)
            command_seconds = time.perf_counter() - answered
            peak = peak_rss(daemon.pid)
            report_problems(daemon)
        spool.close()
        inotify.close()
        if status["scheduled"] != deferred:
            raise RuntimeError(f"the daemon scheduled {status['scheduled']} messages, expected {deferred}")
        if shown.returncode != 0 or str(deferred) not in shown.stdout:
            raise RuntimeError(f"qrouter status failed or missed the deferred messages:\n{shown.stdout}{shown.stderr}")
    first = delivered - started
    print(f"  first delivery {first:.2f}s after process start; supervisor RSS then {rss / 2**20:.1f} MB, "
          f"PSS {pss / 2**20:.1f} MB, {status['scheduled']} scheduled")
    print(f"  a status request took {(answered - asked) * 1000:.0f} ms; RSS in its answer "
          f"{status['rss'] / 2**20:.1f} MB, peak (VmHWM) {peak / 2**20:.1f} MB")
    print(f"  the `qrouter status` command (a new Python process that asks the socket and counts the queue "
          f"directories) took {command_seconds:.2f}s")
    return {"rss_mb": rss / 2**20, "pss_mb": pss / 2**20, "peak_mb": peak / 2**20, "first_delivery_s": first,
            "status_ms": (answered - asked) * 1000, "status_command_s": command_seconds}


def relay_to(sink: Sink) -> list[str]:
    return ["--relayhost", f"127.0.0.1:{sink.port}"]


class Accepting(Protocol):
    """What the wait functions read from a sink (smtp_sink.Sink or wan_sink.WanSink)."""

    def accepted(self) -> int: ...

    def last_accepted(self) -> float: ...


def wait_for_sink(sink: Accepting, count: int, timeout: float, daemon: Daemon | None = None) -> float:
    """Block until the sink has accepted `count` messages in all; returns the perf_counter()
    reading of the last acceptance, as the sink noted it."""
    deadline = time.monotonic() + timeout
    while (accepted := sink.accepted()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sink accepted {accepted} of {count} messages after {timeout:.0f}s")
        if daemon is not None:
            daemon.check_alive()
        time.sleep(0.005)
    return sink.last_accepted()


def wait_for_first(sink: Accepting, before: int, timeout: float, daemon: Daemon) -> float:
    """perf_counter() when the sink's count first passed `before`, polled every millisecond."""
    deadline = time.monotonic() + timeout
    while sink.accepted() <= before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sink accepted nothing in {timeout:.0f}s")
        daemon.check_alive()
        time.sleep(0.001)
    return time.perf_counter()


def smtp_ceiling(sink: Sink, envelopes: list[tuple[str, bytes]]) -> tuple[float, float]:
    """Seconds the plain pipelining client takes to have `envelopes` accepted by the sink, and
    the CPU seconds the sink used meanwhile."""
    before, cpu = sink.accepted(), sink.cpu_seconds()
    started = blast(sink.port, SENDER, envelopes, SMTP_CONNECTIONS)
    seconds = wait_for_sink(sink, before + len(envelopes), DRAIN_TIMEOUT) - started
    return seconds, sink.cpu_seconds() - cpu


def spool_floor(sink: Sink, spool: Spool, queue_ids: list[str], log_path: Path) -> float:
    """Seconds the spool floor (bench/spool_floor.py) takes to relay `queue_ids` from `spool`
    until the sink has accepted them all."""
    before = sink.accepted()
    started = relay_spool(str(spool.root), queue_ids, sink.port, SMTP_CONNECTIONS, str(log_path))
    return wait_for_sink(sink, before + len(queue_ids), DRAIN_TIMEOUT) - started


def wait_for_counter(daemon: Daemon, sent: int, timeout: float = DELIVERY_TIMEOUT) -> dict[str, Any]:
    """The daemon's status once its "sent" counter reaches `sent` (its files are gone by then)."""
    deadline = time.monotonic() + timeout
    while True:
        status = daemon.status()
        if status["counters"]["sent"] >= sent:
            return status
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon counted {status['counters']} after {timeout:.0f}s, expected {sent} sent")
        time.sleep(0.01)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time (user + system) of a process and of all its children together."""
    process = psutil.Process(pid)
    own = process.cpu_times()
    children = 0.0
    for child in process.children():
        try:
            times = child.cpu_times()
            children += times.user + times.system
        except psutil.Error:
            pass
    return own.user + own.system, children


def bench_smtp_drain(keep: bool) -> dict[str, float]:
    """The ceiling client and the spool floor each run half their messages before the daemon and
    half after, so a change in the machine's load during the run weighs on all sides alike."""
    with workspace("smtp-drain", keep) as root, Sink(SINK_PROCESSES) as sink:
        daemon = Daemon(root, SMTP_WORKERS, relay_to(sink))
        spool = Spool(daemon.spool)
        floor_spool = Spool(root / "floor-spool")
        envelopes = [(f"user{index % DRAIN_USERS}@{DOMAIN}", message(index)) for index in range(SMTP_MESSAGES)]
        setup = time.perf_counter()
        queued = {}
        for queue in (spool, floor_spool):
            queue.create()
            queued[queue] = [queue.enqueue(SENDER, [recipient], body) for recipient, body in envelopes]
            queue.close()
        floor_ids = queued[floor_spool]  # the router finds its own in incoming/
        print(f"  queued {SMTP_MESSAGES} messages twice (router, spool floor) with Spool.enqueue "
              f"in {time.perf_counter() - setup:.1f}s")
        wires = [(recipient, wire_message(body)) for recipient, body in envelopes]
        half = SMTP_MESSAGES // 2
        ceiling_seconds, ceiling_sink_cpu = smtp_ceiling(sink, wires[:half])
        floor_seconds = spool_floor(sink, floor_spool, floor_ids[:half], root / "floor.log")
        with daemon:
            before = sink.accepted()
            sink_cpu = sink.cpu_seconds()
            started = daemon.start()
            first = wait_for_first(sink, before, DRAIN_TIMEOUT, daemon)
            finished = wait_for_sink(sink, before + SMTP_MESSAGES, DRAIN_TIMEOUT, daemon)
            sink_cpu = sink.cpu_seconds() - sink_cpu
            supervisor_cpu, workers_cpu = cpu_seconds(daemon.pid)
            status = wait_for_counter(daemon, SMTP_MESSAGES)
            report_problems(daemon)
        floor_seconds += spool_floor(sink, floor_spool, floor_ids[half:], root / "floor.log")
        seconds, cpu = smtp_ceiling(sink, wires[half:])
        ceiling_seconds, ceiling_sink_cpu = ceiling_seconds + seconds, ceiling_sink_cpu + cpu
        if sink.accepted() != 3 * SMTP_MESSAGES:
            raise RuntimeError(f"the sink accepted {sink.accepted()} messages, expected {3 * SMTP_MESSAGES}")
        if floor_spool.list("incoming") or floor_spool.list("active"):
            raise RuntimeError("the spool floor left messages in its spool")
        if status["counters"] != {"sent": SMTP_MESSAGES, "deferred": 0, "bounced": 0}:
            raise RuntimeError(f"the daemon counted {status['counters']}")
        left = {queue: len(spool.list(queue)) for queue in ("incoming", "active", "deferred")}
        if any(left.values()):
            raise RuntimeError(f"messages left in the spool: {left}")
    router_rate = SMTP_MESSAGES / (finished - started)
    ceiling_rate = SMTP_MESSAGES / ceiling_seconds
    ratio = router_rate / ceiling_rate
    floor_rate = SMTP_MESSAGES / floor_seconds
    steady_rate = (SMTP_MESSAGES - 1) / (finished - first)
    cpu_per_message = (supervisor_cpu + workers_cpu) / SMTP_MESSAGES * 1000
    print(f"  router: {SMTP_MESSAGES} relayed in {finished - started:.2f}s = {router_rate:.0f} msg/s "
          f"(cpu: supervisor {supervisor_cpu:.2f}s, workers {workers_cpu:.2f}s = {cpu_per_message:.3f} ms a message "
          f"from launch to the last accepted, sink {sink_cpu:.2f}s "
          f"= {sink_cpu / (finished - started) / SINK_PROCESSES:.0%} of its {SINK_PROCESSES} processes' time); "
          f"{router_rate / POSTFIX_RATE:.2f}x Postfix's {POSTFIX_RATE:.0f} msg/s")
    print(f"  of which start-up (launch to the first message accepted) {first - started:.2f}s; "
          f"from then on {steady_rate:.0f} msg/s")
    print(f"  sink ceiling (plain pipelining client, {SMTP_CONNECTIONS} connections): "
          f"{SMTP_MESSAGES} in {ceiling_seconds:.2f}s = {ceiling_rate:.0f} msg/s "
          f"(sink cpu {ceiling_sink_cpu:.2f}s = {ceiling_sink_cpu / ceiling_seconds / SINK_PROCESSES:.0%} "
          f"of its processes' time)")
    print(f"  spool floor (claim, read, send, unlink, log; {SMTP_CONNECTIONS} processes): {SMTP_MESSAGES} in "
          f"{floor_seconds:.2f}s = {floor_rate:.0f} msg/s = {floor_rate / ceiling_rate:.2f} of the ceiling")
    print(f"  ratio router/ceiling: {ratio:.2f}; router/spool floor: {router_rate / floor_rate:.2f}")
    return {"router_rate": router_rate, "ceiling_rate": ceiling_rate, "ratio": ratio,
            "floor_rate": floor_rate, "floor_ratio": floor_rate / ceiling_rate,
            "router_floor_ratio": router_rate / floor_rate, "startup_s": first - started,
            "steady_rate": steady_rate, "postfix_factor": router_rate / POSTFIX_RATE,
            "cpu_ms_per_message": cpu_per_message}


def bench_smtp_latency(keep: bool) -> dict[str, float]:
    with workspace("smtp-latency", keep) as root, Sink(SINK_PROCESSES, notify=True) as sink:
        daemon = Daemon(root, LATENCY_WORKERS, relay_to(sink))
        spool = Spool(daemon.spool)
        spool.create()

        def accepted(index: int) -> float:
            arrived = sink.wait_accepted(DELIVERY_TIMEOUT)
            if arrived is None:
                daemon.check_alive()
                raise RuntimeError(f"message {index} not accepted by the sink after {DELIVERY_TIMEOUT:.0f}s")
            return arrived

        with daemon:
            daemon.start()
            daemon.wait_serving()
            figures = measure_latency(spool, accepted, "the sink's 250")
            wait_for_counter(daemon, LATENCY_WARMUP + LATENCY_MESSAGES)
            report_problems(daemon)
        spool.close()
    return figures


def transports_to(root: Path, sink: WanSink, domains: Sequence[str]) -> list[str]:
    """A transports file sending domain i to the sink's port i, and the flag that uses it."""
    path = root / "transports"
    path.write_text("".join(f"{domain} 127.0.0.1:{port}\n" for domain, port in zip(domains, sink.ports, strict=True)))
    return ["--transports", str(path)]


@dataclass(frozen=True)
class Relayed:
    """What the sink saw of a daemon relaying mail queued while it was stopped, and the daemon's
    memory meanwhile."""

    seconds: float  # from the daemon's launch to the last message accepted
    startup: float  # from the launch to the first message accepted
    steady: float  # msg/s from the first message accepted to the last
    round_trips: float  # per message, as the sink counts them (wan_sink), greetings and QUITs included
    peaks: list[int]  # per port, the most connections open at once
    pss_mb: float  # peak of all qrouter processes' PSS summed
    rss_mb: float  # and of their RSS
    processes: int
    sink_cpu: float  # share of one core the sink used
    status: dict[str, Any]  # the daemon's status once it counted them all sent


def steady_rate(times: list[float]) -> float:
    """msg/s from the first message accepted (at `times`[0]) to the last."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def relay_queued(sink: WanSink, daemon: Daemon, count: int) -> Relayed:
    """Start the daemon on its spool of `count` queued messages, all for the sink, and measure
    until the sink has accepted them all; then stop it (so its QUITs are counted too)."""
    before, turns = sink.accepted(), sink.round_trips()
    with daemon:
        sink_cpu = sink.cpu_seconds()
        started = daemon.start()
        with MemorySampler(daemon.pid) as memory:
            finished = wait_for_sink(sink, before + count, WAN_TIMEOUT, daemon)
        sink_cpu = sink.cpu_seconds() - sink_cpu
        status = wait_for_counter(daemon, count)
        report_problems(daemon)
    times = [record.at for record in sink.records()][before:before + count]
    return Relayed(finished - started, times[0] - started, steady_rate(times), (sink.round_trips() - turns) / count,
                   sink.peak_connections(), memory.peak_pss / 2**20, memory.peak_rss / 2**20,
                   memory.peak_processes, sink_cpu / (finished - started), status)
def bench_smtp_wan(keep: bool) -> dict[str, float]:
    """Every variant, each with a sink and a spool of its own; figures are named by variant."""
    figures: dict[str, float] = {}
    with workspace("smtp-wan", keep) as root:
        for variant, (delay, _, chunking) in WAN_VARIANTS.items():
            print(f"  {delay} (ms), the sink {'offers' if chunking else 'does not offer'} CHUNKING:", flush=True)
            figures.update({f"{variant}_{key}": value for key, value in
                            wan_variant(root / variant, delay, chunking).items()})
    return figures


def wan_variant(root: Path, delay: Delay, chunking: bool) -> dict[str, float]:
    """One delay, with a sink that offers CHUNKING or not, relayed by qrouter and then by a private
    Postfix (bench/postfix.py) in the same run; the sink is checked only in the variant without
    CHUNKING (the plain client sends DATA either way)."""
    domains = [f"d{index}.example" for index in range(WAN_DESTINATIONS)]
    envelopes = [(index % len(domains), f"m{index}@{domains[index % len(domains)]}", message(index))
                 for index in range(WAN_MESSAGES)]
    root.mkdir()
    with WanSink([delay] * len(domains), chunking=chunking) as sink:
        daemon = Daemon(root, None, transports_to(root, sink, domains))
        spool = Spool(daemon.spool)
        spool.create()
        for _, recipient, body in envelopes:
            spool.enqueue(SENDER, [recipient], body)
        spool.close()
        relayed = relay_queued(sink, daemon, WAN_MESSAGES)
        spread = [sink.accepted(port) for port in range(len(domains))]
        postfix_rate, postfix_steady, postfix_pss = postfix_relays(root / "postfix", sink, domains,
                                                   [(recipient, body) for _, recipient, body in envelopes])
        if not chunking:  # the check: the same messages from memory through the same delays, many connections
            check_cpu, check_turns = sink.cpu_seconds(), sink.round_trips()
            wires = [(port, recipient, wire_message(body)) for port, recipient, body in envelopes]
            per_port = max(40, math.ceil(WAN_CHECK_RATE * (2 * delay.reply + delay.dot) / len(domains)))
            check_started = push(sink, SENDER, wires, per_port)
            check_seconds = wait_for_sink(sink, 2 * WAN_MESSAGES, DRAIN_TIMEOUT) - check_started
            check_cpu = sink.cpu_seconds() - check_cpu
            check_turns = sink.round_trips() - check_turns
    rate = WAN_MESSAGES / relayed.seconds
    print(f"    router: {WAN_MESSAGES} relayed to {len(domains)} destinations in {relayed.seconds:.1f}s = "
          f"{rate:.0f} msg/s; Postfix in the same run {postfix_rate:.0f} msg/s ({rate / postfix_rate:.2f}x)")
    print(f"    of which start-up (launch to the first message accepted) {relayed.startup:.2f}s; "
          f"from then on {relayed.steady:.0f} msg/s (Postfix {postfix_steady:.0f})")
    print(f"    round trips per message at the sink: {relayed.round_trips:.2f}")
    print(f"    most connections open at once, per destination: {relayed.peaks}; messages per destination "
          f"{min(spread)} to {max(spread)}")
    print(f"    all qrouter processes together, peak of the samples every {MEMORY_INTERVAL}s: "
          f"PSS {relayed.pss_mb:.1f} MB, RSS {relayed.rss_mb:.1f} MB, {relayed.processes} processes; "
          f"Postfix in the same run {postfix_pss:.1f} MB PSS")
    figures = {"rate": rate, "steady_rate": relayed.steady, "postfix_rate": postfix_rate,
               "postfix_steady_rate": postfix_steady,
               "postfix_factor": rate / postfix_rate, "postfix_pss_mb": postfix_pss,
               "round_trips": relayed.round_trips, "peak_connections": max(relayed.peaks),
               "pss_mb": relayed.pss_mb, "rss_mb": relayed.rss_mb, "sink_cpu": relayed.sink_cpu}
    if chunking:
        print(f"    sink: cpu {relayed.sink_cpu:.1%} of one core while the router ran")
        return figures
    check_rate = WAN_MESSAGES / check_seconds
    print(f"    sink: cpu {relayed.sink_cpu:.1%} of one core while the router ran; checked with a plain client "
          f"({per_port * len(domains)} connections): {check_rate:.0f} msg/s with the sink at "
          f"{check_cpu / check_seconds:.0%} of one core, {check_turns / WAN_MESSAGES:.2f} round trips per message")
    return {**figures, "check_rate": check_rate, "check_sink_cpu": check_cpu / check_seconds}


def postfix_relays(home: Path, sink: WanSink, domains: Sequence[str],
                   messages: list[tuple[str, bytes]]) -> tuple[float, float, float]:
    """Postfix's rate (launch to the last message the sink accepted), its rate from the first
    message accepted, and its peak PSS, relaying the same messages, queued while it was stopped,
    to the same sink."""
    postfix = PrivatePostfix(home, dict(zip(domains, sink.ports, strict=True)))
    postfix.queue(SENDER, messages, len(messages))
    before = sink.accepted()
    started = time.perf_counter()
    postfix.start()
    postfix.flush()
    with MemorySampler(postfix.master_pid()) as memory:
        finished = wait_for_sink(sink, before + len(messages), WAN_TIMEOUT)
    postfix.stop()
    times = [record.at for record in sink.records()][before:before + len(messages)]
    return len(messages) / (finished - started), steady_rate(times), memory.peak_pss / 2**20


def rollup_zone() -> str:
    """The zone of mx-rollup: ROLLUP_DOMAINS domains whose MX records name the same hosts, and
    the hosts' addresses (all this machine)."""
    lines = [f"d{index}.{ROLLUP_ORIGIN} 60 IN MX {10 * (rank + 1)} {host}."
             for index in range(ROLLUP_DOMAINS) for rank, host in enumerate(ROLLUP_HOSTS)]
    lines += [f"{host}. 60 IN A 127.0.0.1" for host in ROLLUP_HOSTS]
    return "\n".join(lines) + "\n"


def loopback_dns(zone: str, origin: str) -> Any:
    """The test suite's authoritative name server (tests/dns_server.py) serving `zone` on
    loopback; a context manager whose `servers` is the matching `dns-servers` value."""
    if str(ROOT) not in sys.path:  # the benchmark runs as bench/run.py: tests/ is not on the path
        sys.path.append(str(ROOT))
    from tests.dns_server import DNSServer
    return DNSServer(zone, origin=origin)


def bench_mx_rollup(keep: bool) -> dict[str, float]:
    domains = [f"d{index}.{ROLLUP_ORIGIN}".rstrip(".") for index in range(ROLLUP_DOMAINS)]
    site = f"site:{','.join(ROLLUP_HOSTS)}"
    with workspace("mx-rollup", keep) as root, WanSink([ROLLUP_DELAY]) as sink, \
            loopback_dns(rollup_zone(), ROLLUP_ORIGIN) as dns:
        daemon = Daemon(root, None, ["--dns-servers", dns.servers, "--smtp-port", str(sink.ports[0])])
        spool = Spool(daemon.spool)
        spool.create()
        for index in range(ROLLUP_MESSAGES):
            spool.enqueue(SENDER, [f"m{index}@{domains[index % ROLLUP_DOMAINS]}"], message(index))
        spool.close()
        relayed = relay_queued(sink, daemon, ROLLUP_MESSAGES)
        asked = len(dns.queries)
    shown = {state["destination"]: state for state in relayed.status["destinations"]}
    counted = shown.get(site, {}).get("domains", 0)
    rate = ROLLUP_MESSAGES / relayed.seconds
    print(f"  router: {ROLLUP_MESSAGES} relayed to {ROLLUP_DOMAINS} domains, all with MX hosts "
          f"{', '.join(ROLLUP_HOSTS)}, in {relayed.seconds:.1f}s = {rate:.0f} msg/s ({ROLLUP_DELAY} ms)")
    print(f"    of which start-up (launch to the first message accepted) {relayed.startup:.2f}s; "
          f"from then on {relayed.steady:.0f} msg/s; {relayed.round_trips:.2f} round trips per message")
    print(f"    most connections open at once at the sink: {relayed.peaks[0]} (the site's limit "
          f"{ROLLUP_LIMIT}); the daemon's status names {site} with {counted} domains; "
          f"{asked} DNS questions answered ({asked / ROLLUP_MESSAGES:.1f} a message)")
    print(f"    all qrouter processes together, peak: PSS {relayed.pss_mb:.1f} MB, RSS {relayed.rss_mb:.1f} MB")
    return {"rate": rate, "steady_rate": relayed.steady, "peak_connections": relayed.peaks[0],
            "round_trips": relayed.round_trips, "site_domains": counted, "pss_mb": relayed.pss_mb,
            "dns_per_message": asked / ROLLUP_MESSAGES}


def redis_server() -> Any:
    """The test suite's redis-server (tests/redis_server.py) on a free loopback port, keeping nothing on disk."""
    if str(ROOT) not in sys.path:  # the benchmark runs as bench/run.py: tests/ is not on the path
        sys.path.append(str(ROOT))
    from tests.redis_server import RedisServer
    return RedisServer()


@dataclass(frozen=True)
class ClusterRun:
    """What one run of the cluster benchmark measured."""

    rate: float  # msg/s from the first launch (with a dead backlog: from the first message queued) to the last accepted
    steady: float  # msg/s from the first message accepted to the last
    peak: int  # the most connections open at once at the sink
    round_trips: float  # Redis exchanges per message, as every node's status counts them
    gets: float  # Redis GET commands per message (INFO commandstats); 0 without Redis or with the outage


def cluster_round_trips(daemons: Sequence[Daemon]) -> int:
    """The Redis exchanges all the nodes made so far, as their status counts them."""
    return sum(status["cluster"]["round_trips"] for daemon in daemons if (status := daemon.status()).get("cluster"))


def wait_for_dead(daemons: Sequence[Daemon], dead: int) -> None:
    """Until every node found its `dead` destinations dead and deferred their mail, and the demand
    of their last attempts is no more (DEMAND_SECONDS): from then on each only holds deferred mail."""
    deadline = time.monotonic() + WAN_TIMEOUT
    for daemon in daemons:
        while daemon.log().count("is not reachable") < dead or len(os.listdir(daemon.spool / DEFERRED)) < dead:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{daemon.spool}: its {dead} dead destinations not all found dead "
                                   f"in {WAN_TIMEOUT:.0f}s")
            daemon.check_alive()
            time.sleep(0.1)
    time.sleep(DEMAND_SECONDS + 1)


def cluster_run(root: Path, nodes: Sequence[str], redis: Any = None, outage: bool = False, dead: int = 0
                ) -> ClusterRun:
    """CLUSTER_MESSAGES spread over the spools of `nodes` (with a RedisServer, nodes of one cluster),
    all for one WanSink port whose limit is CLUSTER_LIMIT, queued while they are stopped; the
    daemons start together. With `outage`, Redis is killed once a third of the mail is accepted.
    With `dead`, each node's spool holds at launch one message for each of `dead` destinations of
    its own instead, ports of DEAD_HOST that refuse connections (initial-window=1: one refusal
    makes each dead; with DEAD_BACKOFF none is probed during the run), and the CLUSTER_MESSAGES
    are queued once all are found dead: from then on (the Redis counts too) the nodes deliver
    while they hold a dead backlog, as a relay does."""
    root.mkdir()
    with WanSink([CLUSTER_DELAY]) as sink:
        port = sink.ports[0]
        dead_ports = range(DEAD_PORT, DEAD_PORT + dead * len(nodes))  # node i has the i-th `dead` of them
        (root / "destinations").write_text(f"smtp:127.0.0.1:{port} concurrency={CLUSTER_LIMIT}\n" + "".join(
            f"smtp:{DEAD_HOST}:{dead_port} initial-window=1\n" for dead_port in dead_ports))
        routing = [*transports_to(root, sink, ["d.example"]), "--destinations", str(root / "destinations")]
        with open(root / "transports", "a") as transports:
            transports.write("".join(f"dead{dead_port}.example {DEAD_HOST}:{dead_port}\n" for dead_port in dead_ports))
        if redis is not None:
            routing += ["--cluster-redis", redis.url]
        if dead:
            routing += ["--min-backoff", DEAD_BACKOFF]
        daemons, spools = [], []
        for index, name in enumerate(nodes):
            (root / name).mkdir(mode=0o1777)
            (root / name).chmod(0o1777)
            daemons.append(Daemon(root / name, None, [*routing, "--cluster-node", name]))
            spool = Spool(daemons[-1].spool)
            spool.create()
            for dead_port in dead_ports[index * dead:(index + 1) * dead]:
                spool.enqueue(SENDER, [f"m@dead{dead_port}.example"], message(dead_port))
            spools.append(spool)
        client = redis.client() if redis is not None and not outage else None
        try:
            if dead:  # the backlog is found dead before the live mail comes
                for daemon in daemons:
                    daemon.start()
                wait_for_dead(daemons, dead)
            trips = -cluster_round_trips(daemons) if dead else 0
            if client is not None:
                client.config_resetstat()
            started = time.perf_counter()
            for number in range(CLUSTER_MESSAGES):
                spools[number % len(nodes)].enqueue(SENDER, [f"m{number}@d.example"], message(number))
            for spool in spools:
                spool.close()
            if not dead:
                started = min(daemon.start() for daemon in daemons)
            if outage:
                wait_for_sink(sink, CLUSTER_MESSAGES // 3, WAN_TIMEOUT)
                redis.kill()
            finished = wait_for_sink(sink, CLUSTER_MESSAGES, WAN_TIMEOUT)
            gets = int(client.info("commandstats").get("cmdstat_get", {}).get("calls", 0)) if client is not None else 0
            for daemon in daemons:
                wait_for_counter(daemon, 0)
                report_problems(daemon)
            trips += cluster_round_trips(daemons)
        finally:
            for daemon in daemons:
                daemon.stop()
        times = [record.at for record in sink.records()]
        return ClusterRun(CLUSTER_MESSAGES / (finished - started), steady_rate(times), sink.peak_connections()[0],
                          trips / CLUSTER_MESSAGES, gets / CLUSTER_MESSAGES)


def bench_cluster(keep: bool) -> dict[str, float]:
    with workspace("cluster", keep) as root:
        single = cluster_run(root / "single", ["one"])
        print(f"  one node, no Redis: {CLUSTER_MESSAGES} messages at {single.rate:.0f} msg/s ({CLUSTER_DELAY} ms), "
              f"at most {single.peak} connections (limit {CLUSTER_LIMIT})")
        with redis_server() as redis:
            three = cluster_run(root / "three", CLUSTER_NODES, redis)
        print(f"  three nodes, one Redis: {three.rate:.0f} msg/s ({three.rate / single.rate:.2f}x one node), "
              f"{three.steady:.0f} from the first accepted, at most {three.peak} connections (the shared limit "
              f"{CLUSTER_LIMIT}), {three.round_trips:.2f} Redis round trips and {three.gets:.2f} GETs per message")
        with redis_server() as redis:
            outage = cluster_run(root / "outage", CLUSTER_NODES, redis, outage=True)
        print(f"  three nodes, Redis killed after a third: {outage.rate:.0f} msg/s ({outage.rate / three.rate:.2f}x "
              f"with Redis), at most {outage.peak} connections")
        with redis_server() as redis:
            backlog = cluster_run(root / "dead", CLUSTER_NODES, redis, dead=CLUSTER_DEAD)
        print(f"  three nodes holding mail for {CLUSTER_DEAD:,} dead destinations each: {backlog.steady:.0f} msg/s "
              f"from the first accepted ({backlog.steady / three.steady:.2f}x without them), {backlog.rate:.0f} from "
              f"the first queued, at most {backlog.peak} connections, {backlog.round_trips:.2f} Redis round trips and "
              f"{backlog.gets:.2f} GETs per message")
    return {"single_rate": single.rate, "rate": three.rate, "ratio": three.rate / single.rate,
            "steady_rate": three.steady, "peak_connections": three.peak, "redis_round_trips": three.round_trips,
            "redis_gets": three.gets, "outage_rate": outage.rate, "outage_peak_connections": outage.peak,
            "dead_rate": backlog.steady, "dead_ratio": backlog.steady / three.steady,
            "dead_peak_connections": backlog.peak, "dead_redis_round_trips": backlog.round_trips,
            "dead_redis_gets": backlog.gets}


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile; works with math.inf standing for a message never accepted."""
    ranked = sorted(values)
    return ranked[max(0, math.ceil(share * len(ranked)) - 1)]


def bench_slow_destination(keep: bool) -> dict[str, float]:
    """The fast messages are queued while the daemon is busy with the slow ones; at the end the
    sink stops first, so the workers stuck in 20 s waits fail at once and the daemon stops
    without waiting out its shutdown-timeout."""
    with workspace("slow-destination", keep) as root, WanSink([SLOW, FAST]) as sink:
        slow_port, fast_port = 0, 1
        daemon = Daemon(root, None, transports_to(root, sink, ["slow.example", "fast.example"]))
        spool = Spool(daemon.spool)
        spool.create()
        for index in range(SLOW_MESSAGES):
            spool.enqueue(SENDER, [f"m{index}@slow.example"], message(index))
        bodies = [message(index) for index in range(FAST_MESSAGES)]
        with daemon:
            try:
                started = daemon.start()
                daemon.wait_serving()
                time.sleep(max(0.0, started + FAST_AFTER - time.perf_counter()))
                queued = []
                burst = time.perf_counter()
                for index, body in enumerate(bodies):
                    spool.enqueue(SENDER, [f"m{index}@fast.example"], body)
                    queued.append(time.perf_counter())
                while sink.accepted(fast_port) < FAST_MESSAGES and time.perf_counter() < queued[-1] + FAST_TIMEOUT:
                    daemon.check_alive()
                    time.sleep(0.01)
                accepted = {record.tag: record.at for record in sink.records() if record.port == fast_port}
                slow_accepted, peaks = sink.accepted(slow_port), sink.peak_connections()
            finally:
                sink.close()
            report_problems(daemon)
        spool.close()
    # one accepted before its enqueue() returned (the daemon may deliver while enqueue still fsyncs) counts as 0
    latencies = [max(0.0, accepted.get(index, math.inf) - at) for index, at in enumerate(queued)]
    all_seconds = max(accepted.values()) - burst if len(accepted) == FAST_MESSAGES else math.inf
    print(f"  {SLOW_MESSAGES} to a destination that answers after {SLOW.reply:.0f}s, then {FAST_MESSAGES} to one that "
          f"answers at once, queued {burst - started:.1f}s after the daemon's launch "
          f"(taking {queued[-1] - burst:.2f}s)")
    if math.isinf(all_seconds):
        print(f"  TIMEOUT: {len(accepted)} of {FAST_MESSAGES} fast messages accepted {FAST_TIMEOUT:.0f}s after "
              f"they were queued")
    else:
        print(f"  all {FAST_MESSAGES} fast messages accepted {all_seconds:.2f}s after the first of them was queued")
    p50, p99 = (percentile(latencies, share) * 1000 for share in (0.5, 0.99))
    print(f"  fast messages, enqueue() returned to accepted: p50 {p50:.1f} ms, p99 {p99:.1f} ms (inf: not accepted)")
    print(f"  slow destination: {slow_accepted} accepted, at most {peaks[slow_port]} connections at once; "
          f"fast destination: at most {peaks[fast_port]}")
    return {"fast_all_s": all_seconds, "fast_p50_ms": p50, "fast_p99_ms": p99, "fast_accepted": len(accepted),
            "slow_connections": peaks[slow_port]}


# -- the summary ----------------------------------------------------------------------------


def wan_label(delay: Delay, chunking: bool) -> str:
    return f"{delay}{', CHUNKING' if chunking else ''}"


@dataclass(frozen=True)
class Figure:
    benchmark: str
    key: str
    label: str
    unit: str
    target: float | None  # None: shown for context, no target
    higher_is_better: bool = False
    at_most: bool = False  # the target itself passes (a limit that must hold), not only what is below it

    def passes(self, value: float) -> bool | None:
        if self.target is None:
            return None
        if self.higher_is_better:
            return value >= self.target
        return value <= self.target if self.at_most else value < self.target

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        sign = ">=" if self.higher_is_better else "<=" if self.at_most else "<"
        return f"{sign} {self.target:g} {self.unit}".strip()


FIGURES = [
    Figure("latency", "p50_ms", "enqueue-to-Maildir p50", "ms", 5),
    Figure("latency", "p99_ms", "enqueue-to-Maildir p99", "ms", 50),
    Figure("latency", "total_p50_ms", "p50 incl. enqueue() itself", "ms", None),
    Figure("latency", "total_p99_ms", "p99 incl. enqueue() itself", "ms", None),
    Figure("drain", "router_rate", "router drain rate", "msg/s", None, higher_is_better=True),
    Figure("drain", "reference_rate", "reference loop rate", "msg/s", None, higher_is_better=True),
    Figure("drain", "ratio", "ratio router/reference", "", 0.7, higher_is_better=True),
    Figure("memory", "rss_mb", "supervisor RSS after start", "MB", 100),
    Figure("memory", "pss_mb", "supervisor PSS after start", "MB", None),
    Figure("memory", "peak_mb", "supervisor peak RSS", "MB", None),
    Figure("memory", "first_delivery_s", "start to first delivery", "s", 5),
    Figure("memory", "status_ms", "status request, 100k deferred", "ms", None),
    Figure("memory", "status_command_s", "`qrouter status` command, 100k deferred", "s", None),
    Figure("deferred-200k", "rss_mb", "supervisor RSS after start", "MB", None),
    Figure("deferred-200k", "pss_mb", "supervisor PSS after start", "MB", None),
    Figure("deferred-200k", "peak_mb", "supervisor peak RSS", "MB", None),
    Figure("deferred-200k", "first_delivery_s", "start to first delivery", "s", 5),
    Figure("deferred-200k", "status_ms", "status request (socket only), 200k deferred", "ms", None),
    Figure("deferred-200k", "status_command_s", "`qrouter status` command, 200k deferred", "s", 1),
    Figure("queue-ops", "list_first_s", "`queue list` of 200k: first line", "s", 1),
    Figure("queue-ops", "list_all_s", "`queue list` of 200k: all", "s", None),
    Figure("queue-ops", "status_s", "`qrouter status`, 200k deferred", "s", 1),
    Figure("queue-ops", "flush_p50_ms", "new mail p50 during a flush of 10k", "ms", None),
    Figure("queue-ops", "flush_p99_ms", "new mail p99 during a flush of 10k", "ms", 100),
    Figure("smtp-drain", "router_rate", "router relay rate", "msg/s", None, higher_is_better=True),
    Figure("smtp-drain", "startup_s", "start-up: launch to first message accepted", "s", None),
    Figure("smtp-drain", "steady_rate", "router relay rate after start-up", "msg/s", None, higher_is_better=True),
    Figure("smtp-drain", "ceiling_rate", "sink ceiling (plain client)", "msg/s", None, higher_is_better=True),
    Figure("smtp-drain", "ratio", "ratio router/ceiling", "", 0.6, higher_is_better=True),
    Figure("smtp-drain", "floor_rate", "spool floor (least a spooling relay does)", "msg/s", None,
           higher_is_better=True),
    Figure("smtp-drain", "floor_ratio", "ratio spool floor/ceiling", "", None, higher_is_better=True),
    Figure("smtp-drain", "router_floor_ratio", "ratio router/spool floor", "", None, higher_is_better=True),
    Figure("smtp-drain", "cpu_ms_per_message", "daemon CPU (user+sys, all processes) per message", "ms", None),
    Figure("smtp-drain", "postfix_factor", "router rate / Postfix 1250 msg/s", "", None, higher_is_better=True),
    Figure("smtp-latency", "p50_ms", "enqueue-to-sink p50", "ms", 5),
    Figure("smtp-latency", "p99_ms", "enqueue-to-sink p99", "ms", 50),
    Figure("smtp-latency", "total_p50_ms", "p50 incl. enqueue() itself", "ms", None),
    Figure("smtp-latency", "total_p99_ms", "p99 incl. enqueue() itself", "ms", None),
    *(figure for variant, (delay, name, chunking) in WAN_VARIANTS.items() for figure in (
        Figure("smtp-wan", f"{variant}_rate", f"{wan_label(delay, chunking)}: rate, launch to last accepted", "msg/s",
               None, higher_is_better=True),
        Figure("smtp-wan", f"{variant}_postfix_rate", f"{wan_label(delay, chunking)}: Postfix's rate in the same run, "
               "launch to last accepted", "msg/s", None, higher_is_better=True),
        Figure("smtp-wan", f"{variant}_steady_rate", f"{wan_label(delay, chunking)}: rate from the first accepted",
               "msg/s", None, higher_is_better=True),
        Figure("smtp-wan", f"{variant}_postfix_steady_rate", f"{wan_label(delay, chunking)}: Postfix's rate from the "
               "first accepted", "msg/s", None, higher_is_better=True),
        Figure("smtp-wan", f"{variant}_postfix_factor",
               f"{wan_label(delay, chunking)}: rate / Postfix's in the same run (aim: twice)", "", 2,
               higher_is_better=True),
        Figure("smtp-wan", f"{variant}_round_trips", f"{wan_label(delay, chunking)}: round trips per message", "",
               None),
        Figure("smtp-wan", f"{variant}_peak_connections", f"{wan_label(delay, chunking)}: most connections to one "
               "destination", "", WAN_CONCURRENCY, at_most=True),
        Figure("smtp-wan", f"{variant}_pss_mb", f"{wan_label(delay, chunking)}: peak PSS, all qrouter processes",
               "MB", WAN_PSS_TARGET_MB),
        Figure("smtp-wan", f"{variant}_postfix_pss_mb", f"{wan_label(delay, chunking)}: peak PSS, all Postfix "
               "processes", "MB", None),
        Figure("smtp-wan", f"{variant}_rss_mb", f"{wan_label(delay, chunking)}: peak RSS summed, all qrouter processes",
               "MB", None),
        Figure("smtp-wan", f"{variant}_sink_cpu", f"{wan_label(delay, chunking)}: sink CPU under the router, share of "
               "a core", "", None),
        *(() if chunking else (
            Figure("smtp-wan", f"{variant}_check_rate", f"{wan_label(delay, chunking)}: sink check, plain client",
                   "msg/s", None, higher_is_better=True),
            Figure("smtp-wan", f"{variant}_check_sink_cpu", f"{wan_label(delay, chunking)}: sink CPU in the check, "
                   "share of a core", "", None))))),
    Figure("cluster", "single_rate", f"one node, {CLUSTER_DELAY}: rate", "msg/s", None, higher_is_better=True),
    Figure("cluster", "rate", "three nodes, one Redis: rate", "msg/s", None, higher_is_better=True),
    Figure("cluster", "ratio", "three nodes / one node", "", None, higher_is_better=True),
    Figure("cluster", "steady_rate", "three nodes, one Redis: rate from the first accepted", "msg/s", None,
           higher_is_better=True),
    Figure("cluster", "peak_connections", f"most connections at once (shared limit {CLUSTER_LIMIT})", "",
           CLUSTER_LIMIT, at_most=True),
    Figure("cluster", "redis_round_trips", "Redis round trips per message", "", None),
    Figure("cluster", "redis_gets", "Redis GETs per message", "", None),
    Figure("cluster", "outage_rate", "three nodes, Redis killed after a third: rate", "msg/s", None,
           higher_is_better=True),
    Figure("cluster", "outage_peak_connections", "most connections at once, with the outage", "", None),
    Figure("cluster", "dead_rate", f"three nodes, {CLUSTER_DEAD:,} dead destinations each: rate from the first "
           "accepted", "msg/s", None, higher_is_better=True),
    Figure("cluster", "dead_ratio", "with the dead backlog / without, from the first accepted", "", None,
           higher_is_better=True),
    Figure("cluster", "dead_peak_connections", "most connections at once, with the dead backlog", "", CLUSTER_LIMIT,
           at_most=True),
    Figure("cluster", "dead_redis_round_trips", "Redis round trips per message, with the dead backlog", "", None),
    Figure("cluster", "dead_redis_gets", "Redis GETs per message, with the dead backlog", "", None),
    Figure("mx-rollup", "rate", f"{ROLLUP_DELAY}: rate, launch to last accepted", "msg/s", None, higher_is_better=True),
    Figure("mx-rollup", "steady_rate", f"{ROLLUP_DELAY}: rate from the first accepted", "msg/s", None,
           higher_is_better=True),
    Figure("mx-rollup", "peak_connections", f"most connections at once to the site of {ROLLUP_DOMAINS} domains", "",
           ROLLUP_LIMIT, at_most=True),
    Figure("mx-rollup", "site_domains", "domains the daemon counts in the site", "", None, higher_is_better=True),
    Figure("mx-rollup", "round_trips", "round trips per message", "", None),
    Figure("mx-rollup", "dns_per_message", "DNS questions per message", "", None),
    Figure("mx-rollup", "pss_mb", "peak PSS, all qrouter processes", "MB", WAN_PSS_TARGET_MB),
    Figure("slow-destination", "fast_all_s", "first fast message queued to all accepted", "s", 3),
    Figure("slow-destination", "fast_p99_ms", "fast messages: enqueue-to-accepted p99", "ms", 1000),
    Figure("slow-destination", "fast_p50_ms", "fast messages: enqueue-to-accepted p50", "ms", None),
    Figure("slow-destination", "fast_accepted", f"fast messages accepted within {FAST_TIMEOUT:.0f} s", "", None,
           higher_is_better=True),
    Figure("slow-destination", "slow_connections", "connections held by the slow destination", "", None),
    Figure("verify", "p50_ms", "policy-only verdict on the socket p50", "ms", 5),
    Figure("verify", "p99_ms", "policy-only verdict on the socket p99", "ms", 5),
    Figure("verify", "max_ms", "policy-only verdict on the socket, slowest", "ms", None),
    Figure("verify", "command_s", "`qrouter verify` command", "s", None),
    Figure("policy", "load_ms", "load 10,000 transport rules", "ms", None),
    Figure("policy", "lookups_per_s", "lookups with 10,000 rules", "/s", None, higher_is_better=True),
    Figure("policy", "speedup", "lookups, ratio to a first-match linear scan", "", None, higher_is_better=True),
]

BENCHMARKS: dict[str, Callable[[bool], dict[str, float]]] = {
    "latency": bench_latency, "drain": bench_drain, "memory": bench_memory,
    "smtp-drain": bench_smtp_drain, "smtp-latency": bench_smtp_latency, "policy": bench_policy,
    "smtp-wan": bench_smtp_wan, "mx-rollup": bench_mx_rollup, "cluster": bench_cluster,
    "slow-destination": bench_slow_destination,
    "deferred-200k": functools.partial(bench_memory, deferred=DEFERRED_200K, workers=None, name="deferred-200k"),
    "queue-ops": bench_queue_ops, "verify": bench_verify}
IN_PROCESS = {"policy"}  # runs no daemon, so --baseline has nothing to run it with


def cell(figure: Figure, value: float | None) -> str:
    if value is None:
        return "failed"
    if math.isinf(value):
        return "timeout MISS" if figure.target is not None else "timeout"
    verdict = figure.passes(value)
    number = f"{value:.2f}" if abs(value) < 100 and not isinstance(value, int) else f"{value:.0f}"
    text = f"{number} {figure.unit}".strip()
    return text if verdict is None else f"{text} {'PASS' if verdict else 'MISS'}"


Results = dict[str, list[dict[str, float] | None]]  # benchmark -> one entry per run, None if it failed


def better_and_worse(figure: Figure, runs: list[dict[str, float] | None]) -> tuple[float | None, float | None]:
    """The better and the worse of a figure's runs; None for a benchmark that failed."""
    values = [run[figure.key] if run is not None else None for run in runs]
    measured = sorted((v for v in values if v is not None), reverse=figure.higher_is_better)
    better = measured[0] if measured else None
    worse = measured[-1] if len(measured) == len(values) else None  # a failed run is the worst
    return better, worse


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or not math.isfinite(value) or not math.isfinite(base) or base == 0:
        return "-"
    return f"{value / base:.2f}"


def summary(results: Results, runs: int, baseline: Results | None = None) -> list[str]:
    """One row per figure: its target, then the measured value, or the better and the worse run;
    with a baseline, the better run of each checkout and their ratio (this tree / baseline)."""
    columns = ("this tree", "baseline", "ratio") if baseline is not None else \
        ("measured",) if runs == 1 else ("better run", "worse run")
    header = ("benchmark", "figure", "target", *columns)
    rows = [header]
    for figure in FIGURES:
        if figure.benchmark not in results:
            continue
        better, worse = better_and_worse(figure, results[figure.benchmark])
        if baseline is not None:
            base = better_and_worse(figure, baseline[figure.benchmark])[0] if figure.benchmark in baseline else None
            shown = cell(figure, base) if figure.benchmark in baseline else "-"
            cells: tuple[str, ...] = (cell(figure, better), shown, ratio(better, base))
        else:
            cells = (cell(figure, better),) if runs == 1 else (cell(figure, better), cell(figure, worse))
        rows.append((figure.benchmark, figure.label, figure.target_text(), *cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", nargs="*", metavar="BENCHMARK",
                        help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--repeat", type=int, default=1, choices=range(1, 6), metavar="N",
                        help="runs of each benchmark, 1 to 5 (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work directories under /tmp")
    parser.add_argument("--sink-chunking", action="store_true",
                        help="the SMTP sinks offer CHUNKING, so the router sends BDAT pipelined with the envelope "
                             "(the plain clients that check the sinks still send DATA); smtp-wan runs both ways "
                             "whatever this says")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also run each benchmark with the daemon running the code of another checkout "
                             "(e.g. one made by `git worktree add DIR COMMIT`), and show both figures and their ratio")
    args = parser.parse_args()
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    chosen = args.benchmarks or list(BENCHMARKS)
    Session.chunking = args.sink_chunking
    checkouts = {"this tree": ROOT}
    if args.baseline is not None:
        problem = check_checkout(args.baseline.resolve())
        if problem:
            parser.error(problem)
        checkouts["baseline"] = args.baseline.resolve()
        skipped = [name for name in chosen if name in IN_PROCESS]
        if skipped:
            print(f"{', '.join(skipped)}: no daemon to run from the baseline; this tree only")
    for code in checkouts.values():
        compile_checkout(code)
    results: dict[str, Results] = {
        label: {name: [] for name in chosen if label == "this tree" or name not in IN_PROCESS} for label in checkouts}
    began = time.monotonic()
    for name in chosen:
        for run in range(1, args.repeat + 1):
            # which checkout goes first alternates, so a drift in the machine's load weighs on both alike
            for label, code in list(checkouts.items())[::1 if run % 2 else -1]:
                if name not in results[label]:
                    continue
                Daemon.code = code
                print(f"{name}, run {run}{f', {label} ({code})' if len(checkouts) > 1 else ''}:", flush=True)
                try:
                    results[label][name].append(BENCHMARKS[name](args.keep))
                except RuntimeError as exc:
                    print(f"  FAILED: {exc}")
                    results[label][name].append(None)
    print(f"\nsummary ({args.repeat} run(s) each, {time.monotonic() - began:.0f}s in all; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores):")
    for line in summary(results["this tree"], args.repeat, results.get("baseline")):
        print(line)
    return 1 if any(run is None for by_name in results.values() for runs in by_name.values() for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
