"""qrouter benchmarks: delivery latency, drain throughput, and footprint with a large deferred queue;
the same latency and throughput through SMTP to a relay host.

    bench/run.py                      all of them, once each
    bench/run.py latency drain        a selection
    bench/run.py --repeat 2           each benchmark twice; the summary shows the better and worse run

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
         and the supervisor's resident memory right then (before any status request, which
         lists every queue directory and adds a few MB of its own).
smtp-drain
         10,000 messages of 4 KB, one recipient each, queued while the daemon is stopped; then the
         daemon starts with 4 workers and `--relayhost` pointing at a lean SMTP sink on loopback
         (bench/smtp_sink.py, 2 processes, no disk): messages/s from process start to the last
         message the sink accepted, and how much of that was start-up (launch to the first
         message accepted). Reference (the ceiling): the same 10,000 messages sent to the same
         sink by a plain pipelining client over 4 connections, 4 processes (EHLO once; per
         message MAIL, RCPT, DATA in one write, then the message). Second reference (the spool
         floor, bench/spool_floor.py): the same messages queued in a spool of their own, relayed
         by 4 processes that per message only claim (rename), read, send, unlink and log. Half
         of each reference runs before the daemon and half after. For context, Postfix relays
         about 1,250 already-queued 4 KB messages/s to a loopback sink on a 2-core machine like
         this one.
policy   A transports file of 10,000 rules (domains, wildcards, a few regexes): load time, and
         lookups per second by the daemon's indexed first-match lookup against a linear
         first-match scan over the same rules, measured in the same run (both give the same rules).
smtp-latency
         An idle daemon with 2 workers relaying to the sink; messages queued one at a time with
         Spool.enqueue. Per message: from enqueue() returning to the sink's acceptance of the
         message (its reply to the final dot), timed by the sink with the same monotonic clock.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from inotify_simple import INotify
from inotify_simple import flags as inotify_flags
from policy_lookup import bench_policy
from smtp_sink import Sink, blast, wire_message
from spool_floor import relay_spool

from router.queue_file import QueueFile, Recipient
from router.queue_id import arrival_of, new_queue_id
from router.spool import DEFERRED, Spool
from router.status_socket import StatusError, query

ROOT = Path(__file__).resolve().parent.parent
SENDER = "bench@example.org"
DOMAIN = "example.org"
MESSAGE_SIZE = 4096

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
    """Create a Maildir as a mail system provisions its users; returns its new/ directory."""
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path / "new"


@contextmanager
def workspace(name: str, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"qrouter-bench-{name}-", dir="/tmp"))
    try:
        yield path
    finally:
        if keep:
            print(f"  kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """`qrouter run --foreground` in a subprocess, logging into a file in the workspace."""

    def __init__(self, root: Path, workers: int, routing: Sequence[str] = ()):
        """`routing`: the flags that say where mail goes; by default into Maildirs under mail/."""
        self.spool = root / "spool"
        self.mail = root / "mail"
        self.log_path = root / "qrouter.log"
        self.workers = workers
        self.routing = list(routing) or ["--default-transport", f"queue/maildir {self.mail}/%d/%u"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Launch the daemon; returns the perf_counter() reading just before the launch."""
        command = [sys.executable, "-m", "router", "run", "--foreground", "--queue-dir", str(self.spool),
                   "--workers", str(self.workers), *self.routing]
        with open(self.log_path, "ab") as log:
            started = time.perf_counter()
            self.process = subprocess.Popen(command, stdout=log, stderr=log, cwd=ROOT, start_new_session=True)
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


def fill_deferred(spool: Spool, count: int, due: float) -> None:
    """Write small valid queue files straight into deferred/; no fsync, this is only setup."""
    directory = spool.path(DEFERRED)
    body = b"Subject: waiting\n\nfor a retry\n"
    for index in range(count):
        queue_id = new_queue_id()
        queue_file = QueueFile(queue_id, arrival_of(queue_id), SENDER,
                               [Recipient(f"later{index % 1000}@{DOMAIN}")], body, attempts=1)
        fd = os.open(os.path.join(directory, queue_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, queue_file.to_bytes())
            os.utime(fd, (due, due))
        finally:
            os.close(fd)


def peak_rss(pid: int) -> int:
    """The process's high-water resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_memory(keep: bool) -> dict[str, float]:
    with workspace("memory", keep) as root:
        daemon = Daemon(root, MEMORY_WORKERS)
        spool = Spool(daemon.spool)
        spool.create()
        setup = time.perf_counter()
        fill_deferred(spool, MEMORY_DEFERRED, time.time() + 3600)
        print(f"  wrote {MEMORY_DEFERRED} queue files into deferred/ in {time.perf_counter() - setup:.1f}s")
        new_dir = make_maildir(daemon.mail / DOMAIN / "first")
        inotify = INotify()
        inotify.add_watch(new_dir, inotify_flags.MOVED_TO)
        with daemon:
            started = daemon.start()
            spool.enqueue(SENDER, [f"first@{DOMAIN}"], message(0))
            delivered = wait_for_renames(inotify, 1, DRAIN_TIMEOUT, daemon)
            rss = psutil.Process(daemon.pid).memory_info().rss  # before a status request adds its own
            daemon.wait_serving()
            asked = time.perf_counter()
            status = daemon.status()
            answered = time.perf_counter()
            peak = peak_rss(daemon.pid)
            report_problems(daemon)
        spool.close()
        inotify.close()
        if status["scheduled"] != MEMORY_DEFERRED:
            raise RuntimeError(f"the daemon scheduled {status['scheduled']} messages, expected {MEMORY_DEFERRED}")
    first = delivered - started
    print(f"  first delivery {first:.2f}s after process start; supervisor RSS then {rss / 2**20:.1f} MB, "
          f"{status['scheduled']} scheduled")
    print(f"  a status request took {(answered - asked) * 1000:.0f} ms; RSS in its answer "
          f"{status['rss'] / 2**20:.1f} MB, peak (VmHWM) {peak / 2**20:.1f} MB")
    return {"rss_mb": rss / 2**20, "peak_mb": peak / 2**20, "first_delivery_s": first,
            "status_ms": (answered - asked) * 1000}


def relay_to(sink: Sink) -> list[str]:
    return ["--relayhost", f"127.0.0.1:{sink.port}"]


def wait_for_sink(sink: Sink, count: int, timeout: float, daemon: Daemon | None = None) -> float:
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


def wait_for_first(sink: Sink, before: int, timeout: float, daemon: Daemon) -> float:
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
    print(f"  router: {SMTP_MESSAGES} relayed in {finished - started:.2f}s = {router_rate:.0f} msg/s "
          f"(cpu: supervisor {supervisor_cpu:.2f}s, workers {workers_cpu:.2f}s, sink {sink_cpu:.2f}s "
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
            "steady_rate": steady_rate, "postfix_factor": router_rate / POSTFIX_RATE}


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


# -- the summary ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    benchmark: str
    key: str
    label: str
    unit: str
    target: float | None  # None: shown for context, no target
    higher_is_better: bool = False

    def passes(self, value: float) -> bool | None:
        if self.target is None:
            return None
        return value >= self.target if self.higher_is_better else value < self.target

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<'} {self.target:g} {self.unit}".strip()


FIGURES = [
    Figure("latency", "p50_ms", "enqueue-to-Maildir p50", "ms", 5),
    Figure("latency", "p99_ms", "enqueue-to-Maildir p99", "ms", 50),
    Figure("latency", "total_p50_ms", "p50 incl. enqueue() itself", "ms", None),
    Figure("latency", "total_p99_ms", "p99 incl. enqueue() itself", "ms", None),
    Figure("drain", "router_rate", "router drain rate", "msg/s", None, higher_is_better=True),
    Figure("drain", "reference_rate", "reference loop rate", "msg/s", None, higher_is_better=True),
    Figure("drain", "ratio", "ratio router/reference", "", 0.7, higher_is_better=True),
    Figure("memory", "rss_mb", "supervisor RSS after start", "MB", 100),
    Figure("memory", "peak_mb", "supervisor peak RSS", "MB", None),
    Figure("memory", "first_delivery_s", "start to first delivery", "s", 5),
    Figure("memory", "status_ms", "status request, 100k deferred", "ms", None),
    Figure("smtp-drain", "router_rate", "router relay rate", "msg/s", None, higher_is_better=True),
    Figure("smtp-drain", "startup_s", "start-up: launch to first message accepted", "s", None),
    Figure("smtp-drain", "steady_rate", "router relay rate after start-up", "msg/s", None, higher_is_better=True),
    Figure("smtp-drain", "ceiling_rate", "sink ceiling (plain client)", "msg/s", None, higher_is_better=True),
    Figure("smtp-drain", "ratio", "ratio router/ceiling", "", 0.6, higher_is_better=True),
    Figure("smtp-drain", "floor_rate", "spool floor (least a spooling relay does)", "msg/s", None,
           higher_is_better=True),
    Figure("smtp-drain", "floor_ratio", "ratio spool floor/ceiling", "", None, higher_is_better=True),
    Figure("smtp-drain", "router_floor_ratio", "ratio router/spool floor", "", None, higher_is_better=True),
    Figure("smtp-drain", "postfix_factor", "router rate / Postfix 1250 msg/s", "", None, higher_is_better=True),
    Figure("smtp-latency", "p50_ms", "enqueue-to-sink p50", "ms", 5),
    Figure("smtp-latency", "p99_ms", "enqueue-to-sink p99", "ms", 50),
    Figure("smtp-latency", "total_p50_ms", "p50 incl. enqueue() itself", "ms", None),
    Figure("smtp-latency", "total_p99_ms", "p99 incl. enqueue() itself", "ms", None),
    Figure("policy", "load_ms", "load 10,000 transport rules", "ms", None),
    Figure("policy", "lookups_per_s", "lookups with 10,000 rules", "/s", None, higher_is_better=True),
    Figure("policy", "speedup", "lookups, ratio to a first-match linear scan", "", None, higher_is_better=True),
]

BENCHMARKS: dict[str, Callable[[bool], dict[str, float]]] = {
    "latency": bench_latency, "drain": bench_drain, "memory": bench_memory,
    "smtp-drain": bench_smtp_drain, "smtp-latency": bench_smtp_latency, "policy": bench_policy}


def cell(figure: Figure, value: float | None) -> str:
    if value is None:
        return "failed"
    verdict = figure.passes(value)
    number = f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    text = f"{number} {figure.unit}".strip()
    return text if verdict is None else f"{text} {'PASS' if verdict else 'MISS'}"


def summary(results: dict[str, list[dict[str, float] | None]], runs: int) -> list[str]:
    """One row per figure: its target, then the measured value, or the better and the worse run."""
    header = ("benchmark", "figure", "target", *(("measured",) if runs == 1 else ("better run", "worse run")))
    rows = [header]
    for figure in FIGURES:
        if figure.benchmark not in results:
            continue
        values = [run[figure.key] if run is not None else None for run in results[figure.benchmark]]
        measured = sorted((v for v in values if v is not None), reverse=figure.higher_is_better)
        better = measured[0] if measured else None
        worse = measured[-1] if len(measured) == len(values) else None  # a failed run is the worst
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
    args = parser.parse_args()
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    chosen = args.benchmarks or list(BENCHMARKS)
    results: dict[str, list[dict[str, float] | None]] = {name: [] for name in chosen}
    began = time.monotonic()
    for name in chosen:
        for run in range(1, args.repeat + 1):
            print(f"{name}, run {run}:", flush=True)
            try:
                results[name].append(BENCHMARKS[name](args.keep))
            except RuntimeError as exc:
                print(f"  FAILED: {exc}")
                results[name].append(None)
    print(f"\nsummary ({args.repeat} run(s) each, {time.monotonic() - began:.0f}s in all; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores):")
    for line in summary(results, args.repeat):
        print(line)
    return 1 if any(run is None for runs in results.values() for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
