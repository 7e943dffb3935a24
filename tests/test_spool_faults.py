"""The spool under faults: a full file system, things in queue directories that are not queue
files, queue directories replaced by hand, a worker killed while rewriting, and a message that has
been tried more than a thousand times.

The full file system is real: a small ext4 image on a loop device, mounted as the spool for the
length of one test. ext4 is used rather than tmpfs because on ext4 even a rename can fail when
the disk is full (a directory that must grow needs a block), which is where qrouter used to lose
its workers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from router.spool import Spool
from router.spool.queue_file import QueueFile, Recipient, parse
from router.spool.queue_id import arrival_of, new_queue_id
from tests.daemon import DAEMON_USER, Daemon, message_in, qrouter, wait_for
from tests.smtp_servers import AioServer, Peer, Recorder, ScriptedServer
from tests.test_bad_input import fill

MESSAGE = b"Subject: hello\n\nbody\n"
FAST = ("--min-backoff", "0.5", "--max-backoff", "1")


def deaths(daemon: Daemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if re.search(r"worker \d+ (was killed|exited)", line)]


# -- a full disk ---------------------------------------------------------------------------------

class Ext4:
    """A small ext4 file system on a loop device, mounted at `mount_point` until `unmount`."""

    def __init__(self, image: Path, mount_point: Path, size_mb: int = 8):
        subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-m", "0", str(image)], check=True)
        mount_point.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)
        self.mount_point = mount_point

    def unmount(self) -> None:
        for _ in range(50):  # a process that just died may hold it a moment longer
            if subprocess.run(["umount", str(self.mount_point)]).returncode == 0:
                return
            time.sleep(0.1)
        subprocess.run(["umount", "-l", str(self.mount_point)], check=True)


def test_full_disk_is_never_a_worker_death_and_everything_goes_out_once_there_is_room(tmp_path):
    """100 messages for a next hop that is down, on a spool whose disk is full: no attempt can
    store its result, and deferred/ cannot even grow to take the files. Nothing may die, nothing
    may go to hold/, the log says "spool full" once a minute, and once there is room again and the
    next hop is back everything is delivered exactly once without anyone doing anything."""
    count = 100
    sink = AioServer(Recorder())  # its port is chosen now; it listens only once started
    disk = Ext4(tmp_path / "spool.img", tmp_path / "spool")
    daemon = Daemon(tmp_path, "--relayhost", f"127.0.0.1:{sink.port}", *FAST, workers=2, maildir=False)
    spool = Spool(daemon.spool)
    try:
        spool.create()
        # active/ gets room for the claims (ext4 directories never shrink); deferred/ gets none.
        for i in range(count):
            (daemon.spool / "active" / f"room-{i:04}-{'x' * 20}").touch()
        for i in range(count):
            (daemon.spool / "active" / f"room-{i:04}-{'x' * 20}").unlink()
        bodies = {f"Subject: {i}\n\nmessage {i}\n".encode() for i in range(count)}
        for body in bodies:
            spool.enqueue("a@example.org", ["u@example.org"], body)
        filler = fill(daemon.spool)

        daemon.start()
        wait_for(lambda: daemon.log().count("status=deferred") >= 2 * count, 120, "two attempts of every message")
        log = daemon.log()
        assert daemon.process.poll() is None
        assert deaths(daemon) == []
        assert "poison" not in log and "Traceback" not in log
        assert daemon.files("hold") == daemon.files("corrupt") == []
        full = [line for line in log.splitlines() if "spool full" in line]
        assert len(full) == 1, full  # once a minute, and the test has not run a minute yet
        assert f"spool full: {daemon.spool} (No space left on device)" in full[0]
        assert len(daemon.files("deferred")) < count  # most of them could not get there

        filler.unlink()
        with sink:
            wait_for(lambda: len(sink.handler.messages) >= count, 120, "every message delivered")
            daemon.wait_idle(60)
            time.sleep(1)  # a duplicate would arrive in this time
        delivered = [m.content.replace(b"\r\n", b"\n") for m in sink.handler.messages]
        assert sorted(delivered) == sorted(bodies)  # each exactly once
        assert daemon.files("deferred") == daemon.files("active") == daemon.files("incoming") == []
        assert daemon.files("hold") == daemon.files("corrupt") == []
        assert deaths(daemon) == []
        assert daemon.stop() == 0
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()
        spool.close()
        disk.unmount()


# -- things that are not queue files -------------------------------------------------------------

def test_fifo_links_directories_and_huge_files_in_incoming_go_to_corrupt(daemons):
    """A FIFO once blocked a worker in open() forever, and a link to /dev/zero made it read
    forever; both, a directory and a file over any size a queue file may have, all named like
    queue ids, go to corrupt/ with a line naming each, and mail behind them goes out at once."""
    daemon = daemons("--message-size-limit", "10000", start=False, workers=1)
    Spool(daemon.spool).create()
    incoming = daemon.spool / "incoming"
    fifo, zero, directory, huge, linked = (new_queue_id() for _ in range(5))
    os.mkfifo(incoming / fifo)
    os.symlink("/dev/zero", incoming / zero)
    (incoming / directory).mkdir()
    with open(incoming / huge, "wb") as handle:
        handle.truncate(20 << 20)  # sparse: 20 MB that cost no disk
    good_file = daemon.spool / "good-elsewhere"
    good_file.write_bytes(b"a symlink to a real queue file is still not taken")
    os.symlink(good_file, incoming / linked)
    daemon.start()
    good = Spool(daemon.spool).enqueue("a@example.org", ["good@example.org"], MESSAGE)

    wait_for(lambda: daemon.delivered("example.org/good"), 10, "the good message, behind the bad ones")
    wait_for(lambda: len(daemon.files("corrupt")) == 5, 10, "five things in corrupt/")
    wait_for(lambda: f"{good}: removed" in daemon.log(), 10, "the good message removed")
    corrupt = daemon.spool / "corrupt"
    wait_for(lambda: daemon.log().count(": not a queue file, moved to ") >= 5, 10, "the moves logged (after them)")
    log = daemon.log()
    assert f"{fifo}: not a queue file, moved to {corrupt / fifo}: " in log and "not a regular file but a FIFO" in log
    assert f"{zero}: not a queue file, moved to {corrupt / zero}: " in log
    assert f"{linked}: not a queue file, moved to {corrupt / linked}: " in log
    assert log.count("a symbolic link, not a queue file") == 2
    assert f"{directory}: not a queue file, moved to {corrupt / directory}: " in log
    assert "not a regular file but a directory" in log
    assert f"{huge}: not a queue file, moved to {corrupt / huge}: " in log
    assert "20971520 bytes, larger than any queue file may be" in log
    assert os.readlink(corrupt / zero) == "/dev/zero" and (corrupt / directory).is_dir()
    assert deaths(daemon) == [] and daemon.process.poll() is None


def test_enqueue_refuses_a_message_over_message_size_limit(tmp_path):
    config = tmp_path / "qrouter.conf"
    config.write_text(f"queue-dir {tmp_path / 'spool'}\nmessage-size-limit 1000\n")
    result = qrouter("enqueue", "--config", str(config), "-f", "a@example.org", "u@example.org",
                     stdin=b"Subject: big\n\n" + b"x" * 2000)
    assert result.returncode == 64, result.stderr
    assert b"qrouter: message is larger than message-size-limit (1000 bytes)" in result.stderr
    assert os.listdir(tmp_path / "spool" / "incoming") == os.listdir(tmp_path / "spool" / "tmp") == []
    accepted = qrouter("enqueue", "--config", str(config), "-f", "a@example.org", "u@example.org",
                       stdin=b"x" * 700)  # the limit counts the Received: line qrouter adds too
    assert accepted.returncode == 0, accepted.stderr


def test_a_directory_root_made_in_incoming_is_named_once_and_left_alone(daemons):
    """The daemon's user cannot move a directory root made (renaming a directory needs write
    access to it, for its `..`), into active/ or corrupt/: it is named once as what it is and
    left where it is, not retried at every min-backoff with a line blaming the disk."""
    daemon = daemons(*FAST)
    assert daemon.stop() == 0  # the spool is the daemon user's now, and is not walked at the next start
    directory = new_queue_id()
    (daemon.spool / "incoming" / directory).mkdir(mode=0o755)
    daemon.start()
    wait_for(lambda: directory in daemon.log(), 10, "a line about the directory")
    good = Spool(daemon.spool).enqueue("a@example.org", ["good@example.org"], MESSAGE)
    wait_for(lambda: f"{good}: removed" in daemon.log(), 10, "the good message delivered")
    time.sleep(2.5)  # several min-backoff periods: nothing is tried again
    log = daemon.log()
    assert [line.split("]: ", 1)[1] for line in log.splitlines() if directory in line] == [
        f"error: {directory}: not a queue file, left in incoming/, it cannot be moved to corrupt/ (Permission denied): "
        f"{daemon.spool / 'incoming' / directory}: not a regular file but a directory"], log
    assert "spool write error" not in log and "nothing is lost" not in log
    assert daemon.files("incoming") == [directory] and daemon.files("active") == daemon.files("corrupt") == []
    assert "Traceback" not in log and deaths(daemon) == []


def test_what_cannot_be_a_deferred_queue_file_goes_to_corrupt_once(daemons):
    """A directory named like a queue id, a FIFO, and names that are no queue ids in deferred/
    each get one log line and go to corrupt/; they are not retried at every min-backoff."""
    daemon = daemons(*FAST, start=False)
    Spool(daemon.spool).create()
    deferred = daemon.spool / "deferred"
    directory, fifo = new_queue_id(), new_queue_id()
    (deferred / directory).mkdir()
    os.mkfifo(deferred / fifo)
    (deferred / "notes.txt").write_bytes(b"an administrator's notes\n")
    daemon.start()
    (deferred / "dropped-later").write_bytes(b"x\n")
    wait_for(lambda: len(daemon.files("corrupt")) == 4, 10, "four entries in corrupt/")
    time.sleep(2.5)  # several min-backoff periods: nothing is tried again
    log = daemon.log()
    for name, why in [(directory, "not a regular file"), (fifo, "not a regular file"),
                      ("notes.txt", "not a queue id"), ("dropped-later", "not a queue id")]:
        assert log.count(f"deferred/{name}: {why}; moved to corrupt/{name}") == 1, log
    assert daemon.files("deferred") == []
    assert "Traceback" not in log and deaths(daemon) == []


def test_an_unreadable_deferred_file_goes_to_corrupt_and_is_not_retried():
    """Mode 000 stops only a daemon that is not root: the worker runs as nobody here, forked from
    the test (the test's Python may not be reachable to other users)."""
    from policy.routing import load_policy
    from router.config import load
    from workers.delivery import CORRUPTED, Delivery, Report
    from workers.worker import build_transports

    area = Path(tempfile.mkdtemp(prefix="qrouter-test-"))  # pytest's own directories are root's alone
    try:
        os.chmod(area, 0o755)
        root = area / "spool"
        spool = Spool(root)
        spool.create()
        queue_id = new_queue_id()
        spool.write(QueueFile(queue_id, arrival_of(queue_id), "a@example.org", [Recipient("u@example.org")],
                              MESSAGE), "deferred")
        spool.close()
        nobody = 65534
        for path in [root, *root.iterdir(), *root.glob("*/*")]:
            os.chown(path, nobody, nobody)
        os.chmod(root / "deferred" / queue_id, 0)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                os.setgroups([])
                os.setgid(nobody)
                os.setuid(nobody)
                config = load(None, {"queue-dir": str(root), "default-transport": f"queue/maildir {area}/m/%d/%u"})
                report = Delivery(Spool(root), config, load_policy(config), build_transports(config)).attempt(
                    "deferred", queue_id)
                os.write(write_fd, json.dumps(report.to_record()).encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        line = os.read(read_fd, 4096).decode()
        os.waitpid(pid, 0)
        assert Report.from_record(json.loads(line)).result == CORRUPTED
        assert os.listdir(root / "corrupt") == [queue_id]
        assert os.listdir(root / "deferred") == os.listdir(root / "active") == []
    finally:
        shutil.rmtree(area)


@pytest.mark.parametrize("how", ["moved-and-made-again", "removed"])
def test_a_replaced_incoming_directory_is_watched_again(daemons, how):
    """`mv incoming elsewhere; mkdir incoming` once made the daemon move the new incoming/ into
    corrupt/ and never see mail again."""
    daemon = daemons()
    spool = Spool(daemon.spool)
    spool.enqueue("a@example.org", ["u@example.org"], b"before\n")
    wait_for(lambda: len(daemon.delivered()) == 1, what="delivery before")
    incoming = daemon.spool / "incoming"
    if how == "removed":
        incoming.rmdir()
    else:
        made = daemon.spool / "incoming.new"
        made.mkdir(mode=0o700)
        shutil.chown(made, DAEMON_USER)  # as the daemon's user would make it
        os.rename(incoming, daemon.spool / "incoming.old")
        os.rename(made, incoming)  # over the empty one the daemon may have made again already
    wait_for(lambda: "incoming/ was moved away or removed; watching the directory now at that path" in daemon.log(),
             what="the warning")
    assert incoming.is_dir()
    spool.enqueue("a@example.org", ["u@example.org"], b"after\n")
    wait_for(lambda: len(daemon.delivered()) == 2, what="delivery after")
    assert daemon.files("corrupt") == []
    assert sorted(message_in(p) for p in daemon.delivered()) == [b"after\n", b"before\n"]
    assert daemon.process.poll() is None


# -- the daemon's own leftovers in tmp/ -------------------------------------------------------

def test_stale_rewrites_are_removed_at_start_and_after_a_worker_dies(daemons):
    daemon = daemons(start=False)
    spool = Spool(daemon.spool)
    spool.create()
    tmp = daemon.spool / "tmp"
    left, writing = new_queue_id(), new_queue_id()
    (tmp / f"{left}.active").write_bytes(b"a rewrite a killed worker left\n")
    (tmp / writing).write_bytes(b"a front door still writing\n")
    daemon.start()
    assert sorted(os.listdir(tmp)) == [writing]
    assert f"removed stale staging file tmp/{left}.active" in daemon.log()

    def hang(peer: Peer) -> None:
        peer.stall()

    with ScriptedServer(hang) as server:
        held = daemons("--relayhost", f"127.0.0.1:{server.port}", start=False)  # the same spool
        daemon.stop()
        held.start()
        queue_id = spool.enqueue("a@example.org", ["u@example.org"], MESSAGE)
        worker = wait_for(lambda: next((w["pid"] for w in held.status()["workers"] if w["queue_id"] == queue_id),
                                       None), what="a worker holding the message")
        (tmp / f"{queue_id}.active").write_bytes(b"half a rewrite\n")
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: f"removed tmp/{queue_id}.active, a rewrite the worker did not finish" in held.log(),
                 what="the cleanup after the worker's death")
        # the message goes again, and the next worker's own rewrite may be under way for a moment
        wait_for(lambda: sorted(os.listdir(tmp)) == [writing], what="tmp/ left with the front door's file only")


# -- a message tried more than a thousand times --------------------------------------------------

def test_a_thousand_attempts_do_not_stop_the_count_or_deliver_twice(daemons, tmp_path):
    """At attempt 1,025 the backoff once overflowed before the file was rewritten: the count
    stopped and the recipient delivered in that attempt was delivered again at every attempt."""
    transports = tmp_path / "transports"
    transports.write_text("later.example queue/retry 4.0.0 not yet\n")
    daemon = daemons("--transports", str(transports), *FAST, start=False)
    spool = Spool(daemon.spool)
    spool.create()
    queue_id = new_queue_id()
    spool.write(QueueFile(queue_id, time.time(), "a@example.org",
                          [Recipient("now@example.org"), Recipient("u@later.example")], MESSAGE, attempts=1024),
                "deferred")
    daemon.start()
    wait_for(lambda: daemon.log().count(f"{queue_id}: deferred, next attempt") >= 3, what="three attempts")
    assert [message_in(p) for p in daemon.delivered("example.org/now")] == [MESSAGE]
    daemon.stop()
    stored = parse((daemon.spool / "deferred" / queue_id).read_bytes())
    assert stored.attempts >= 1027
    assert [r.state for r in stored.recipients] == ["delivered", "pending"]
    assert "Traceback" not in daemon.log()
