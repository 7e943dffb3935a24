"""Crashes with real processes and kill -9: a worker or the supervisor killed in the middle of a
run of 2,000 messages, a message that keeps killing workers, a graceful stop, one daemon per spool.

The promise under test is at-least-once delivery: whatever dies, every message queued ends up
in a Maildir (a copy may arrive twice, none may go missing) and nothing is stranded in active/.

A tiny message is delivered in a few milliseconds, so a kill at a random moment often finds the
workers between messages. To make each kill land in the middle of a delivery, the workers are
first frozen with SIGSTOP at a moment one of them holds a message in active/.
"""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from router.spool import Spool
from router.spool.queue_file import QueueFile, Recipient, parse
from router.spool.queue_id import arrival_of
from tests.daemon import Daemon, freeze, message_in, qrouter, wait_for

RUN = 2000
ALL = {f"n={i}\n".encode() for i in range(RUN)}


class Enqueuer(threading.Thread):
    """Queues messages `n=<i>` for i in `numbers` from the test process, beside the daemon."""

    def __init__(self, spool: Path, numbers: range):
        super().__init__(daemon=True)
        self.spool = Spool(spool)
        self.numbers = numbers
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in self.numbers:
                self.spool.enqueue("sender@example.org", ["user@example.org"], f"n={i}\n".encode())
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.join(120)
        assert not self.is_alive(), "enqueueing did not finish"
        assert self.error is None, f"enqueue failed: {self.error!r}"


def start_run(daemon: Daemon, count: int = RUN) -> Enqueuer:
    """Half the run queued before the daemon starts (the workers have a backlog from the first
    moment), the other half queued while it delivers."""
    Spool(daemon.spool).create()
    first = Enqueuer(daemon.spool, range(count // 2))
    first.run()  # in this thread
    assert first.error is None, f"enqueue failed: {first.error!r}"
    daemon.start()
    second = Enqueuer(daemon.spool, range(count // 2, count))
    second.start()
    return second


def bodies(daemon: Daemon) -> list[bytes]:
    return [message_in(path) for path in daemon.delivered()]


def wait_all_delivered(daemon: Daemon, count: int = RUN, timeout: float = 60) -> None:
    """Wait until the Maildir holds as many messages as the run and the daemon has nothing in hand."""
    wait_for(lambda: len(daemon.delivered()) >= count, timeout, "the whole run in the Maildir")
    daemon.wait_idle()


def gone(pid: int) -> bool:
    """Dead, or dead and not yet reaped by whoever inherited it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def workers_of(daemon: Daemon) -> list[int]:
    """The four workers as soon as they serve: the kernel's list of the supervisor's children,
    without a status round trip, so that the freezing starts while the backlog of the first half
    of the run is still there (the whole run is delivered in about a second). A worker serves
    once it runs a session thread: it starts one for its first message, after it has asked to die
    with the supervisor."""
    def serving() -> list[int]:
        children = psutil.Process(daemon.process.pid).children()
        return [c.pid for c in children] if len(children) == 4 and all(c.num_threads() > 1 for c in children) else []

    return wait_for(serving, what="the four workers serving")


def thaw(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGCONT)


def freeze_holding_mail(daemon: Daemon, pids: list[int], timeout: float = 30,
                        caught: Callable[[list[str]], list] = list) -> list:
    """SIGSTOP the workers at a moment when at least one holds a message in active/, so the kill
    that follows lands in the middle of a delivery; returns `caught` of what is in active/, once
    that is not empty (by default, what is in active/).

    The tests call this early in the run, while most of the first half still waits in
    incoming/: with a backlog every worker is busy and nearly always holds a message. On a
    loaded machine a few tries may still find them between messages, so it keeps trying for
    a while rather than a number of times."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        freeze(pids)
        held = daemon.files("active")
        if held and (found := caught(held)):
            return found
        thaw(pids)
        time.sleep(0.005)
    raise AssertionError(f"never caught a worker holding a message in {timeout:.0f}s; "
                         f"{len(daemon.files('incoming'))} in incoming/, {len(daemon.delivered())} delivered")


def test_worker_killed_mid_delivery_loses_nothing_and_is_replaced(daemons):
    daemon = daemons(workers=4, start=False)
    enqueuer = start_run(daemon)
    pids = workers_of(daemon)
    # the status names a worker's oldest message, which may be one not claimed yet, or filed already
    [(victim, queue_id), *_] = freeze_holding_mail(daemon, pids, caught=lambda held: [
        (w["pid"], w["queue_id"]) for w in daemon.status()["workers"] if w["queue_id"] in held])
    body = parse((daemon.spool / "active" / queue_id).read_bytes()).message
    os.kill(victim, signal.SIGKILL)
    thaw([pid for pid in pids if pid != victim])
    assert len(daemon.delivered()) < RUN, "the run was over before the kill"

    enqueuer.finish()
    wait_all_delivered(daemon)
    assert set(bodies(daemon)) == ALL
    assert body in bodies(daemon)
    assert daemon.files("incoming") == daemon.files("active") == daemon.files("deferred") == []
    assert f"worker {victim} was killed by signal 9 (SIGKILL) while delivering {queue_id}" in daemon.log()

    status = wait_for(lambda: len((s := daemon.status())["workers"]) == 4 and s, what="the pool back to 4")
    new_pids = [w["pid"] for w in status["workers"]]
    assert victim not in new_pids and gone(victim)
    assert all(psutil.Process(pid).ppid() == daemon.process.pid for pid in new_pids)
    assert daemon.process.poll() is None


def test_supervisor_killed_mid_run_then_restart_delivers_everything(daemons):
    daemon = daemons(workers=4, start=False)
    enqueuer = start_run(daemon)
    workers = workers_of(daemon)
    held = freeze_holding_mail(daemon, workers)
    daemon.kill()

    wait_for(lambda: all(gone(pid) for pid in workers), timeout=5, what="the workers to die with the supervisor")
    delivered_at_kill = len(daemon.delivered())
    assert delivered_at_kill < RUN
    enqueuer.finish()  # mail keeps arriving while no daemon runs
    assert len(daemon.delivered()) == delivered_at_kill, "something delivered with no daemon running"
    assert daemon.files("active") == held

    offset = len(daemon.log())
    restarted = daemons(workers=4, start=False)  # same spool, same log file
    restarted.start(wait=False)
    wait_for(lambda: "started:" in restarted.log()[offset:] or restarted.process.poll() is not None,
             what="the restart")
    assert restarted.process.poll() is None, restarted.log()[offset:]
    restart_log = restarted.log()[offset:]
    for queue_id in held:
        assert f"{queue_id}: left in active/ by an earlier run, queued again" in restart_log

    wait_all_delivered(restarted)
    assert set(bodies(restarted)) == ALL
    assert restarted.files("active") == restarted.files("incoming") == restarted.files("deferred") == []
    assert restarted.stop() == 0


def limit_file_size() -> None:
    """In the daemon's process before exec: files may not grow past 1 MB, and no core dumps."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


# Python starts with SIGXFSZ ignored (a write past the limit then fails with EFBIG); a C program
# is killed by it. This runs the same `qrouter` with the signal's default action, so a worker that
# writes past the size limit dies the way a crashing worker does.
DEFAULT_SIGXFSZ = [sys.executable, "-c",
                   "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
                   "from router.admin.cli import main; main()"]


def test_message_that_kills_workers_goes_to_hold_and_others_flow(daemons):
    daemon = daemons(workers=2, preexec_fn=limit_file_size, launcher=DEFAULT_SIGXFSZ)
    spool = Spool(daemon.spool)
    big = b"Subject: too big\n\n" + b"y" * (2 << 20)
    poison = spool.enqueue("sender@example.org", ["big@example.org"], big)
    small = spool.enqueue("sender@example.org", ["small@example.org"], b"Subject: small\n\nafter the big one\n")

    held = daemon.spool / "hold" / poison
    wait_for(held.exists, what="the poison message in hold/")
    wait_for(lambda: f"{poison}: poison message: it killed 3 workers; moved to hold/" in daemon.log(),
             what="the line logged after the move")
    log = daemon.log()
    # A death with other mail in progress in the same worker blames no one (each goes again alone),
    # so it may take a fourth.
    assert 3 <= log.count(f"was killed by signal 25 (SIGXFSZ) while delivering {poison}") <= 4
    assert parse(held.read_bytes(), str(held)).message == big
    assert not daemon.delivered("example.org/big")

    delivered = wait_for(lambda: daemon.delivered("example.org/small"), what="the small message")
    # At least once: in progress in the worker the poison killed, it may have arrived before that death.
    assert {message_in(p) for p in delivered} == {b"Subject: small\n\nafter the big one\n"}
    wait_for(lambda: not any((daemon.spool / queue / small).exists() for queue in ("incoming", "active", "deferred")),
             what="the small message out of the queue")  # its "removed" line may have died with the worker
    later = [spool.enqueue("sender@example.org", ["later@example.org"], f"later {i}\n".encode()) for i in range(20)]
    wait_for(lambda: len(daemon.delivered("example.org/later")) == 20, what="mail queued after the poison")
    wait_for(lambda: all(f"{queue_id}: removed" in daemon.log() for queue_id in later), what="all of it removed")
    assert daemon.files("hold") == [poison]
    assert daemon.files("incoming") == daemon.files("active") == []
    wait_for(lambda: len(daemon.worker_pids()) == 2, what="the pool back to 2")
    assert daemon.process.poll() is None


def test_crash_count_the_file_cannot_take_is_kept_in_memory_and_logged(daemons):
    """The count of deaths lives in the queue file; when the file cannot grow (here: past the file
    size limit, as a full disk would refuse it) the supervisor says so, survives, and its count in
    memory still stops the message within the run."""
    daemon = daemons(workers=2, preexec_fn=limit_file_size, launcher=DEFAULT_SIGXFSZ)
    spool = Spool(daemon.spool)
    big = b"Subject: too big\n\n" + b"y" * (2 << 20)
    poison = spool.enqueue("sender@example.org", ["big@example.org"], big)
    held = daemon.spool / "hold" / poison
    wait_for(held.exists, what="the poison message in hold/")
    wait_for(lambda: f"{poison}: poison message: it killed 3 workers; moved to hold/" in daemon.log(),
             what="the line logged after the move")
    log = daemon.log()
    assert log.count(f"{poison}: cannot count the worker's death in its queue file (File too large); "
                     "counted until the next start only") == 3
    assert held.read_bytes() == spool_file_bytes(poison, big)  # nothing appended, nothing cut
    assert parse(held.read_bytes()).crashes == 0
    assert daemon.process.poll() is None
    later = spool.enqueue("sender@example.org", ["later@example.org"], b"after the poison\n")
    wait_for(lambda: f"{later}: removed" in daemon.log(), what="mail queued after the poison")


def spool_file_bytes(queue_id: str, message: bytes) -> bytes:
    """The queue file `Spool.enqueue` writes for one message of the tests above."""
    return QueueFile(queue_id, arrival_of(queue_id), "sender@example.org", [Recipient("big@example.org")],
                     message).to_bytes()


def test_sigterm_mid_run_exits_0_loses_nothing_and_releases_the_lock(daemons):
    count = 600
    everything = {f"n={i}\n".encode() for i in range(count)}
    daemon = daemons(workers=4, start=False)
    enqueuer = start_run(daemon, count)
    wait_for(lambda: len(daemon.delivered()) >= count // 10, what="some of the run delivered")
    daemon.signal(signal.SIGTERM)
    assert daemon.process.wait(30) == 0
    enqueuer.finish()
    log = daemon.log()
    assert "SIGTERM received: finishing deliveries in progress" in log
    assert log.rstrip().endswith("stopped")

    delivered = set(bodies(daemon))
    assert len(delivered) < count, "the run was over before the stop"
    waiting = {queue: [parse((daemon.spool / queue / name).read_bytes()).message for name in daemon.files(queue)]
               for queue in ("incoming", "deferred", "active")}
    assert delivered | set(waiting["incoming"]) | set(waiting["deferred"]) | set(waiting["active"]) == everything
    if waiting["active"]:
        assert f"stopped with {len(waiting['active'])} message(s) in active/" in log
    else:
        assert "in active/" not in log

    with open(daemon.spool / "qrouter.pid", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anything still holds it
    offset = len(log)
    again = daemons(workers=4, start=False)
    again.start(wait=False)
    # a restart at once starts (nothing holds the lock) rather than exiting: it may take a while on
    # a loaded machine, but it must not give up
    wait_for(lambda: "started:" in again.log()[offset:] or again.process.poll() is not None, timeout=30,
             what="an immediate restart")
    assert again.process.poll() is None, again.log()[offset:]
    wait_all_delivered(again, count)
    assert set(bodies(again)) == everything
    assert again.stop() == 0


def test_second_daemon_on_the_same_spool_is_refused(daemons):
    daemon = daemons()
    second = qrouter("run", "--foreground", "--queue-dir", str(daemon.spool), "--workers", "1", timeout=20)
    assert second.returncode != 0
    assert f"is in use by qrouter pid {daemon.process.pid}".encode() in second.stderr
    assert daemon.status()["pid"] == daemon.process.pid  # its status socket was left alone
    Spool(daemon.spool).enqueue("sender@example.org", ["user@example.org"], b"still served\n")
    delivered = wait_for(lambda: daemon.delivered("example.org/user"), what="delivery by the first daemon")
    assert [message_in(p) for p in delivered] == [b"still served\n"]
    assert (daemon.spool / "qrouter.pid").read_text().strip() == str(daemon.process.pid)
