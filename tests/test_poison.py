"""Poison across restarts: a message that kills every worker delivering it reaches hold/ after
three deaths, even when the supervisor is killed (and started again) between them, because the
count is kept in the message's own queue file.

The message here crashes the worker in the Maildir transport (a stand-in for a bug that a message
triggers), after leaving a torn journal line behind, as a worker killed in the middle of an append
would. A message too large for RLIMIT_FSIZE (tests/test_crash.py) would not do: the count is
appended to the same file, which the limit forbids to grow.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import psutil
import pytest

from router.spool import Spool
from router.spool.queue_file import POISON_CRASHES, parse
from tests.daemon import Daemon, message_in, wait_for

MARK = b"crash the worker"

# `qrouter` with a Maildir transport that dies on a message holding MARK, as a worker with a bug
# does: a torn journal line is left at the end of the queue file, then the process gets SIGSEGV
# (sent to the delivering thread itself, so that it cannot go on to deliver before it dies).
# Where the directory GATE exists beside the spool, each death waits for a file `crash` in it and
# takes it: a test that wants one death at a time lets them through one by one.
GATE = "poison-gate"
CRASH_ON_POISON = [sys.executable, "-c", f"""
import os, signal, sys, threading, time
from workers.maildir import MaildirTransport

spool = sys.argv[sys.argv.index("--queue-dir") + 1]
gate = os.path.join(os.path.dirname(spool), "{GATE}")
deliver = MaildirTransport.deliver

def let_through():
    try:
        os.unlink(os.path.join(gate, "crash"))
        return True
    except FileNotFoundError:
        return False

def deliver_or_crash(self, message, recipients, hop):
    if b"crash the worker" in message.message:
        while os.path.isdir(gate) and not let_through():
            time.sleep(0.05)
        with open(os.path.join(spool, "active", message.queue_id), "ab") as queue_file:
            queue_file.write(b"@0 sta")
        signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)  # this thread: it goes no further
        time.sleep(60)
    return deliver(self, message, recipients, hop)

MaildirTransport.deliver = deliver_or_crash
from router.admin.cli import main
main()
"""]


def no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_daemon(daemon: Daemon) -> None:
    """kill -9 the supervisor; its workers die with it (PR_SET_PDEATHSIG) and free the spool lock."""
    assert daemon.process is not None
    workers = [child.pid for child in psutil.Process(daemon.process.pid).children()]
    daemon.kill()
    wait_for(lambda: all(gone(pid) for pid in workers), timeout=5, what="the workers to die with the supervisor")


def where(daemon: Daemon, queue_id: str) -> list[str]:
    return [queue for queue in ("incoming", "active", "deferred", "hold", "corrupt")
            if (daemon.spool / queue / queue_id).exists()]


def crashes_in_file(daemon: Daemon, queue: str, queue_id: str) -> int:
    path = daemon.spool / queue / queue_id
    return parse(path.read_bytes(), str(path)).crashes


def crashes_recorded(daemon: Daemon, queue_id: str) -> int:
    """The deaths counted in the message's file, in incoming/ or active/ (0 while it moves)."""
    for queue in ("incoming", "active"):
        try:
            return crashes_in_file(daemon, queue, queue_id)
        except FileNotFoundError:
            pass
    return 0


def test_poison_reaches_hold_after_three_deaths_across_supervisor_restarts(daemons):
    daemon = daemons(workers=1, start=False, preexec_fn=no_core_dumps, launcher=CRASH_ON_POISON)
    spool = Spool(daemon.spool)
    spool.create()
    body = b"Subject: poison\n\n" + MARK + b"\n"
    poison = spool.enqueue("sender@example.org", ["victim@example.org"], body)
    death = f"was killed by signal 11 (SIGSEGV) while delivering {poison}"
    poison_line = f"{poison}: poison message: it killed 3 workers; moved to hold/"

    gate = daemon.tmp / GATE
    gate.mkdir()
    gate.chmod(0o777)  # the worker's user takes the file
    for run in range(1, POISON_CRASHES):
        daemon.start()
        (gate / "crash").touch()  # one death; the worker forked after it waits at the gate
        wait_for(lambda run=run: daemon.log().count(death) == run and crashes_recorded(daemon, poison) == run,
                 timeout=10, what=f"worker death {run}, counted in the message's file")
        kill_daemon(daemon)
        assert daemon.log().count(death) == run
        [queue] = where(daemon, poison)  # incoming/, or active/ if its next worker had it at the gate
        assert crashes_in_file(daemon, queue, poison) == run
        data = (daemon.spool / queue / poison).read_bytes()
        assert data.endswith(body + b"@* crash\n"), "the torn line was not cut off before the record"

    gate.rmdir()
    others = [spool.enqueue("sender@example.org", ["other@example.org"], f"other {i}\n".encode())
              for i in range(5)]
    daemon.start()
    held = daemon.spool / "hold" / poison
    wait_for(held.exists, timeout=60, what="the poison message in hold/")
    wait_for(lambda: poison_line in daemon.log(), timeout=30, what="the poison log line")
    log = daemon.log()
    # the last run has other mail in progress beside it: a death shared with it blames no one
    assert POISON_CRASHES <= log.count(death) <= POISON_CRASHES + 1
    assert log.count(poison_line) == 1
    assert daemon.log().count("started:") == POISON_CRASHES
    parsed = parse(held.read_bytes(), str(held))
    assert parsed.message == body
    assert parsed.crashes == 0  # counting starts again if an administrator releases it
    assert held.read_bytes().endswith(b"@* crash\n@* held\n")
    assert not daemon.delivered("example.org/victim")

    # Mail a worker had in hand beside the poison when it died may arrive twice (at least once), and
    # one finished just before that death may lack its "removed" line.
    wanted = {f"other {i}\n".encode() for i in range(5)}
    wait_for(lambda: {message_in(p) for p in daemon.delivered("example.org/other")} == wanted,
             what="the other mail")
    wait_for(lambda: not any((daemon.spool / queue / queue_id).exists()
                             for queue_id in others for queue in ("incoming", "active", "deferred")),
             what="the other mail out of the queue")
    later = spool.enqueue("sender@example.org", ["later@example.org"], b"after the poison\n")
    wait_for(lambda: f"{later}: removed" in daemon.log(), what="mail queued after the poison")
    assert [message_in(p) for p in daemon.delivered("example.org/later")] == [b"after the poison\n"]
    assert daemon.files("hold") == [poison]
    assert daemon.files("incoming") == daemon.files("active") == daemon.files("corrupt") == []
    assert not daemon.delivered("example.org/victim")
    assert daemon.process.poll() is None


def test_released_poison_gets_three_more_tries(daemons):
    """`mv hold/ID incoming/` must not send the message straight back: its count starts again."""
    daemon = daemons(workers=1, start=False, preexec_fn=no_core_dumps, launcher=CRASH_ON_POISON)
    spool = Spool(daemon.spool)
    spool.create()
    poison = spool.enqueue("sender@example.org", ["victim@example.org"], b"Subject: poison\n\n" + MARK + b"\n")
    death = f"while delivering {poison}"
    daemon.start()
    held = daemon.spool / "hold" / poison
    wait_for(held.exists, timeout=60, what="the poison message in hold/")
    assert daemon.log().count(death) == POISON_CRASHES

    # Workers that die within a second of starting, several in a row, stop the daemon as workers
    # that cannot start: let the one alive grow older than that before it meets the message.
    wait_for(daemon.worker_pids, what="a worker")
    time.sleep(1.5)
    os.rename(held, daemon.spool / "incoming" / poison)
    wait_for(lambda: daemon.log().count(death) == POISON_CRASHES + 1, timeout=60, what="a fourth death")
    wait_for(held.exists, timeout=60, what="the poison message in hold/ again")
    held_line = f"{poison}: poison message: it killed 3 workers; moved to hold/"
    wait_for(lambda: daemon.log().count(held_line) == 2, timeout=30, what="the line logged after the move")
    assert daemon.log().count(death) == 2 * POISON_CRASHES
    assert not daemon.delivered()


@pytest.mark.parametrize("rename_fails", [False, True])
def test_hold_poison_resets_the_count_or_changes_nothing(tmp_path, rename_fails):
    spool = Spool(tmp_path / "spool")
    spool.create()
    queue_id = spool.enqueue("a@example.org", ["b@example.org"], b"no final newline")
    os.rename(spool.path("incoming", queue_id), spool.path("active", queue_id))
    for _ in range(POISON_CRASHES):
        spool.record_crash(queue_id)
    with open(spool.path("active", queue_id), "ab") as torn:
        torn.write(b"@0 st")
    before = Path(spool.path("active", queue_id)).read_bytes()
    if rename_fails:
        os.rmdir(spool.path("hold"))
        with pytest.raises(OSError):
            spool.hold_poison(queue_id)
        after = Path(spool.path("active", queue_id)).read_bytes()
        assert after == before[:-len(b"@0 st")]  # only the torn line is gone
        assert parse(after).crashes == POISON_CRASHES
        return
    spool.hold_poison(queue_id)
    assert not os.path.exists(spool.path("active", queue_id))
    data = Path(spool.path("hold", queue_id)).read_bytes()
    assert data == before[:-len(b"@0 st")] + b"@* held\n"
    assert parse(data).crashes == 0
    assert parse(data).message == b"no final newline"


def test_poison_messages_killing_workers_one_after_another_do_not_stop_the_daemon(daemons):
    """Three poison messages kill a young worker again and again (nine deaths or more, most within
    a second of the worker's start): that is the poison count's business, not a sign that workers
    cannot start, so the daemon goes on, holds all three and delivers the rest."""
    daemon = daemons(workers=1, start=False, preexec_fn=no_core_dumps, launcher=CRASH_ON_POISON)
    spool = Spool(daemon.spool)
    spool.create()
    poisons = [spool.enqueue("sender@example.org", ["victim@example.org"], b"Subject: poison\n\n" + MARK + b"\n")
               for _ in range(3)]
    good = spool.enqueue("sender@example.org", ["good@example.org"], b"fine\n")
    daemon.start()
    wait_for(lambda: sorted(daemon.files("hold")) == sorted(poisons), timeout=60, what="all three poisons in hold/")
    wait_for(lambda: daemon.delivered("example.org/good"), what="the good message")
    assert daemon.process.poll() is None
    assert "stopping" not in daemon.log()
    assert not (daemon.spool / "incoming" / good).exists()
