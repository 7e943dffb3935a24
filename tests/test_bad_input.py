"""Bad input from every side: bad addresses and a spool that cannot take mail at the front door,
a full disk under the running daemon, broken files in the queue, broken configuration.

Read-only and full file systems are real: a bind mount remounted read-only and small tmpfs
mounts, made inside a private mount namespace (`unshare --mount`) so that they vanish with the
processes that use them.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from router.spool import HOLD, Spool, SpoolError
from router.spool.queue_file import QueueFile, Recipient
from router.spool.queue_id import arrival_of, new_queue_id
from tests.daemon import ROOT, Daemon, message_in, qrouter, wait_for

MESSAGE = b"Subject: hello\n\nbody\n"


def in_private_mounts(script: str, *params: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """Run a shell script in a mount namespace of its own, with `qrouter` the command under test
    and `params` as $1, $2...; whatever the script mounts disappears when it ends."""
    prelude = f'qrouter() {{ {shlex.quote(sys.executable)} -m router "$@"; }}\n'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", prelude + script, "sh",
                           *map(str, params)], input=stdin, capture_output=True, cwd=ROOT, timeout=60)


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def mounted_under(path: Path) -> list[str]:
    """Mount points at or below `path` in the test's own mount namespace."""
    with open("/proc/self/mountinfo") as mounts:
        points = [line.split()[4] for line in mounts]
    return [point for point in points if point == str(path) or point.startswith(f"{path}/")]


# -- qrouter enqueue ---------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "error"), [
    (["-f", "a@example.org", "u\r@example.org"], "contains CR, LF or NUL"),
    (["-f", "a@example.org", "u@example.org\nRCPT TO:<x@example.org>"], "contains CR, LF or NUL"),
    (["-f", "a@example.org\r\nDATA", "u@example.org"], "contains CR, LF or NUL"),
    (["-f", "a@example.org", "user"], "'user' has no local part and domain (user@domain)"),
    (["-f", "a@example.org", "ok@example.org", "user@"], "'user@' has an empty domain"),
    (["-f", "a@example.org", "<>"], "the null address <> is only valid as a sender"),
    (["-f", "a@example.org"], "Missing argument 'RECIPIENT...'"),
    (["u@example.org"], "Missing option '-f'"),
], ids=["CR", "LF-smuggling", "CRLF-in-sender", "no-at", "one-bad-of-two", "null-recipient", "no-recipients",
        "no-sender"])
def test_enqueue_refuses_bad_addresses_with_64(tmp_path, args, error):
    spool = tmp_path / "spool"
    Spool(spool).create()
    result = qrouter("enqueue", "--queue-dir", str(spool), *args, stdin=MESSAGE)
    assert result.returncode == 64, result.stderr
    assert error in result.stderr.decode()
    assert result.stdout == b""
    assert listing(spool / "incoming") == listing(spool / "tmp") == []


def test_nul_in_an_address_is_refused_by_the_spool_itself(tmp_path):
    """A command line cannot carry NUL; other front doors hand addresses to the spool directly."""
    spool = Spool(tmp_path / "spool")
    spool.create()
    for sender, recipient in [("a@example.org", "u\0@example.org"), ("a\0@example.org", "u@example.org")]:
        with pytest.raises(SpoolError, match="contains CR, LF or NUL") as caught:
            spool.enqueue(sender, [recipient], MESSAGE)
        assert caught.value.temporary is False
    assert listing(tmp_path / "spool" / "incoming") == listing(tmp_path / "spool" / "tmp") == []


@pytest.mark.parametrize("exists", [True, False], ids=["spool-exists", "spool-to-create"])
def test_enqueue_into_read_only_spool_is_75(tmp_path, exists):
    area = tmp_path / "area"
    spool = area / "spool"
    area.mkdir()
    if exists:
        Spool(spool).create()
    result = in_private_mounts('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && '
                               'qrouter enqueue --create --queue-dir "$2" -f a@example.org u@example.org', area, spool,
                               stdin=MESSAGE)
    assert result.returncode == 75, result.stderr
    assert f"qrouter: cannot queue into {spool}: Read-only file system" in result.stderr.decode()
    assert result.stdout == b""
    if exists:
        assert listing(spool / "incoming") == listing(spool / "tmp") == []
    else:
        assert not spool.exists()
    assert not mounted_under(area)


def test_enqueue_into_a_spool_that_does_not_exist_needs_create(tmp_path):
    """A mistyped --queue-dir must not make a spool no daemon reads, and take the mail there."""
    spool = tmp_path / "sppol"
    result = qrouter("enqueue", "--queue-dir", str(spool), "-f", "a@example.org", "u@example.org", stdin=MESSAGE)
    assert result.returncode == 64 and result.stdout == b"", result
    assert result.stderr.decode() == (f"qrouter: no spool at {spool}: no daemon has made one there; check "
                                      "--queue-dir, or give --create to make it\n")
    assert not spool.exists()
    made = qrouter("enqueue", "--create", "--queue-dir", str(spool), "-f", "a@example.org", "u@example.org",
                   stdin=MESSAGE)
    assert made.returncode == 0 and listing(spool / "incoming") == [made.stdout.decode().strip()], made
    assert f"qrouter: made the spool {spool}: no daemon had made it yet" in made.stderr.decode()


def test_enqueue_onto_full_disk_is_75_and_leaves_nothing(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    big, small = tmp_path / "big.eml", tmp_path / "small.eml"
    big.write_bytes(b"Subject: big\n\n" + b"z" * (2 << 20))
    small.write_bytes(MESSAGE)
    result = in_private_mounts(
        'mount -t tmpfs -o size=1m qrouter-test "$1" || exit 99\n'
        'qrouter enqueue --create --queue-dir "$1" -f a@example.org big@example.org < "$2"; echo "big: $?"\n'
        'echo "left: $(ls -A "$1/incoming" "$1/tmp" | grep -v : | tr -d "\\n")"\n'
        'qrouter enqueue --create --queue-dir "$1" -f a@example.org small@example.org < "$3"; echo "small: $?"\n'
        'echo "incoming: $(ls -A "$1/incoming")"; echo "tmp: $(ls -A "$1/tmp")"\n'
        'cat "$1"/incoming/*\n',
        spool, big, small)
    out = result.stdout.decode(errors="replace").splitlines()
    assert result.returncode == 0, result.stderr
    assert out[0] == "big: 75"
    assert f"qrouter: cannot queue into {spool}: No space left on device" in result.stderr.decode()
    assert out[1] == "left: "
    queue_id = out[2]
    assert out[3:6] == ["small: 0", f"incoming: {queue_id}", "tmp: "]
    assert result.stdout.endswith(MESSAGE)
    assert listing(spool) == []  # the tmpfs went with the namespace
    assert not mounted_under(spool)


# -- the daemon on a full disk -----------------------------------------------------------------

def fill(directory: Path) -> Path:
    """Write one file until the file system is full, to the last byte it takes."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = 65536
    try:
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                chunk //= 2
    finally:
        os.close(fd)
    return filler


def test_daemon_on_a_full_disk_defers_stays_up_and_delivers_when_there_is_room(tmp_path):
    """Spool and Maildirs share a 1 MB tmpfs mounted in the daemon's own mount namespace; the test
    reaches it through /proc/PID/root."""
    disk = tmp_path / "disk"
    disk.mkdir()
    launcher = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs -o size=1m qrouter-test "$0" && exec "$@"', str(disk), sys.executable, "-m", "router"]
    daemon = Daemon(disk, "--min-backoff", "0.2", "--max-backoff", "0.4", "--status-socket",
                    str(tmp_path / "status.sock"), workers=1, launcher=launcher)

    def status() -> dict:
        """`qrouter status` run outside the daemon's namespace: the socket is outside the tmpfs."""
        config = tmp_path / "status.conf"
        config.write_text(f"queue-dir {daemon.spool}\nstatus-socket {tmp_path / 'status.sock'}\n")
        return json.loads(qrouter("status", "--json", "--config", str(config), check=True).stdout)

    try:
        daemon.start()
        inside = Path(f"/proc/{daemon.process.pid}/root")
        assert not (disk / "spool").exists(), "the spool is not on the daemon's private tmpfs"
        daemon.spool = inside / daemon.spool.relative_to("/")
        daemon.mail = inside / daemon.mail.relative_to("/")
        spool = Spool(daemon.spool)

        spool.enqueue("a@example.org", ["u@example.org"], b"before the disk filled up\n")
        wait_for(lambda: daemon.delivered("example.org/u"), what="delivery while there is room")
        held_id = new_queue_id()
        held_body = b"Subject: held\n\n" + b"h" * 20000
        spool.write(QueueFile(held_id, arrival_of(held_id), "a@example.org", [Recipient("u@example.org")],
                              held_body), HOLD)
        filler = fill(inside / disk.relative_to("/"))

        refused = qrouter("enqueue", "--queue-dir", str(daemon.spool), "-f", "a@example.org", "u@example.org",
                          stdin=MESSAGE)
        assert refused.returncode == 75
        assert b"No space left on device" in refused.stderr
        assert daemon.files("incoming") == daemon.files("tmp") == []

        os.rename(daemon.spool / "hold" / held_id, daemon.spool / "incoming" / held_id)  # released by hand
        attempt = f"{held_id}: to=<u@example.org>, relay=maildir["
        wait_for(lambda: daemon.log().count(attempt) >= 2, what="two attempts on the full disk")
        lines = [line for line in daemon.log().splitlines() if attempt in line]
        assert all(", dsn=4." in line and ", status=deferred (" in line for line in lines), lines
        assert "No space left on device" in lines[0]
        assert daemon.process.poll() is None
        answer = status()
        assert answer["pid"] == daemon.process.pid and len(answer["workers"]) == 1
        assert answer["counters"]["deferred"] >= 2 and answer["counters"]["sent"] == 1

        filler.unlink()
        wait_for(lambda: f"{held_id}: removed" in daemon.log(), what="delivery once there is room")
        assert ", dsn=2.0.0, status=sent" in [line for line in daemon.log().splitlines() if attempt in line][-1]
        assert sorted(message_in(p) for p in daemon.delivered("example.org/u")) == sorted(
            [b"before the disk filled up\n", held_body])
        assert daemon.files("deferred") == daemon.files("active") == daemon.files("incoming") == []
        assert daemon.stop() == 0
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()
    assert not mounted_under(disk)


# -- broken files in the queue -----------------------------------------------------------------

def drop(spool: Path, name: str, data: bytes) -> None:
    """Put a file into incoming/ the way a writer does: staged in tmp/, then renamed."""
    (spool / "tmp" / name).write_bytes(data)
    os.rename(spool / "tmp" / name, spool / "incoming" / name)


@pytest.mark.parametrize("when", ["running", "at-start"])
def test_broken_queue_files_go_to_corrupt_and_delivery_goes_on(daemons, when):
    daemon = daemons(start=False)
    Spool(daemon.spool).create()
    if when == "running":
        daemon.start()
    truncated, garbage, noise = new_queue_id(), new_queue_id(), new_queue_id()
    whole = QueueFile(truncated, arrival_of(truncated), "a@example.org", [Recipient("u@example.org")],
                      b"Subject: cut\n\n" + b"c" * 5000).to_bytes()
    broken = {truncated: whole[:-1000], garbage: b"GIF89a not a queue file\n\n\x00\x01\x02",
              noise: bytes(range(256)) * 8, "notes.txt": b"left here by an administrator\n"}
    for name, data in broken.items():
        drop(daemon.spool, name, data)
    if when == "at-start":
        daemon.start()
    good = Spool(daemon.spool).enqueue("a@example.org", ["good@example.org"], MESSAGE)

    delivered = wait_for(lambda: daemon.delivered("example.org/good"), what="the good message delivered")
    assert [message_in(p) for p in delivered] == [MESSAGE]
    wait_for(lambda: f"{good}: removed" in daemon.log(), what="the good message removed from the queue")
    wait_for(lambda: len(daemon.files("corrupt")) == 4, what="four files in corrupt/")
    assert {name: (daemon.spool / "corrupt" / name).read_bytes() for name in daemon.files("corrupt")} == broken
    assert daemon.files("incoming") == daemon.files("active") == []
    assert not daemon.delivered("example.org/u")

    def moved(name: str) -> str:
        return f"{name}: corrupt queue file moved to {daemon.spool / 'corrupt'}"

    wait_for(lambda: all(moved(name) in daemon.log() for name in (truncated, garbage, noise)),
             what="the moves logged (after the renames)")
    log = daemon.log().splitlines()

    def line_about(name: str) -> str:
        return next(line for line in log if moved(name) in line)

    assert "truncated: size says 5014 bytes, the file holds 4014" in line_about(truncated)
    assert "not a queue file (expected 'qrouter-queue-file 1')" in line_about(garbage)
    assert "no end of header (empty line)" in line_about(noise)
    wait_for(lambda: "incoming/notes.txt: not a queue id; moved to corrupt/" in daemon.log(), what="the notes' move")
    assert daemon.process.poll() is None


# -- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize(("lines", "error"), [
    (["frobnicate yes"], "{F}:3: unknown key 'frobnicate'"),
    (["workers zero"], "{F}:3: workers 'zero': is not a valid value"),
    (["max-age -1"], "{F}:3: max-age '-1': must be a number from 0 to 1000000"),
    (["archive-failed maybe"], "{F}:3: archive-failed 'maybe': must be yes or no"),
    (["default-transport queue/nonsense"], "{F}:3: default-transport: unknown queue transport 'queue/nonsense'"),
    (["workers 2", "workers 3"], "{F}:4: workers already set at line 3"),
], ids=["unknown-key", "workers-zero", "max-age-negative", "archive-failed-maybe", "transport-nonsense",
        "duplicate"])
def test_run_with_bad_config_file_names_file_line_and_problem(tmp_path, lines, error):
    config = tmp_path / "qrouter.conf"
    config.write_text("# qrouter\nqueue-dir spool\n" + "\n".join(lines) + "\n")
    result = qrouter("run", "--config", str(config), timeout=20)
    try:
        assert result.returncode == 78, result.stderr
        assert f"qrouter: {error.format(F=config)}" in result.stderr.decode()
        assert not (tmp_path / "spool").exists(), "a daemon started"
    finally:
        pid_file = tmp_path / "spool" / "qrouter.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


@pytest.mark.parametrize(("flag", "value", "error"), [
    ("--workers", "0", "--workers: workers '0': must be at least 1"),
    ("--min-backoff", "soon", "--min-backoff: min-backoff 'soon': is not a valid value"),
    ("--default-transport", "queue/nonsense", "--default-transport: default-transport: unknown queue transport"),
])
def test_run_with_bad_flag_names_the_flag(tmp_path, flag, value, error):
    result = qrouter("run", "--foreground", "--queue-dir", str(tmp_path / "spool"), flag, value, timeout=20)
    assert result.returncode == 78, result.stderr
    assert f"qrouter: {error}" in result.stderr.decode()
    assert not (tmp_path / "spool").exists()


def refusals(daemon: Daemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if "reload refused, keeping the running config" in line]


def test_sighup_refuses_broken_config_and_applies_good_one(daemons, tmp_path):
    config = tmp_path / "qrouter.conf"
    config.write_text("# first\ndefault-transport queue/maildir mail-a/%d/%u\n")
    daemon = daemons("--config", str(config))
    spool = Spool(daemon.spool)

    def maildir(name: str) -> list[bytes]:
        return sorted(message_in(p) for p in (tmp_path / name / "example.org" / "u" / "new").glob("*"))

    spool.enqueue("a@example.org", ["u@example.org"], b"one\n")
    wait_for(lambda: maildir("mail-a") == [b"one\n"], what="delivery into mail-a")
    workers = sorted(daemon.worker_pids())

    config.write_text("# half good\ndefault-transport queue/maildir mail-b/%d/%u\narchive-failed maybe\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.log(), what="the reload refused")
    assert f"{config}:3: archive-failed 'maybe': must be yes or no" in refusals(daemon)[0]
    config.unlink()
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: len(refusals(daemon)) == 2, what="the second reload refused")
    assert f"{config}: cannot read config: No such file" in refusals(daemon)[1]
    assert daemon.process.poll() is None
    assert sorted(daemon.worker_pids()) == workers
    spool.enqueue("a@example.org", ["u@example.org"], b"two\n")
    wait_for(lambda: maildir("mail-a") == [b"one\n", b"two\n"], what="delivery into mail-a after the refusals")

    config.write_text("# second\ndefault-transport queue/maildir mail-b/%d/%u\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: f"reloaded {config}" in daemon.log(), what="the reload")
    spool.enqueue("a@example.org", ["u@example.org"], b"three\n")
    wait_for(lambda: maildir("mail-b") == [b"three\n"], what="delivery into mail-b")
    assert maildir("mail-a") == [b"one\n", b"two\n"]
    # the old workers are listed until they have finished and been reaped
    wait_for(lambda: len(pids := daemon.worker_pids()) == 2 and not set(pids) & set(workers), what="two new workers")
    assert daemon.process.poll() is None
