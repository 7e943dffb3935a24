"""`qrouter queue ...` and `qrouter status --shape` against a running daemon and a stopped one:
listing with selectors, show, why, flush, hold, release, delete, requeue; who may change the
queue (SO_PEERCRED); ids that try to leave the spool; malformed requests on the socket."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.spool import Spool
from router.spool.queue_file import QueueFile, Recipient, parse
from router.spool.queue_id import arrival_of, new_queue_id
from tests.daemon import DAEMON_USER, ROOT, contents, message_in, qrouter, wait_for
from tests.unix_users import ALICE, BOB, EXTRA_GROUP, script

LATER = ["--default-transport", "queue/retry 4.2.1 try later", "--min-backoff", "600"]


def queue(daemon, *args: str, user: str | None = None) -> tuple[int, str, str]:
    prefix = ["setpriv", "--reuid", user, "--regid", user, "--init-groups"] if user else None
    result = qrouter("queue", *args, "--queue-dir", str(daemon.spool), launcher_prefix=prefix)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def arrived_ago(seconds: float) -> str:
    """A new queue id whose arrival time, the first part of it, is `seconds` ago."""
    queue_id = new_queue_id()
    return f"{int(queue_id[:13], 16) - round(seconds * 1e6):013X}{queue_id[13:]}"


def deferred_mail(daemon, count: int, domain: str = "example.com", sender: str = "a@example.org",
                  age: float = 0.0) -> list[str]:
    """`count` messages the daemon has tried and deferred, which arrived `age` seconds ago."""
    spool = Spool(daemon.spool)
    ids = [spool.enqueue(sender, [f"u{n}@{domain}"], f"Subject: {n}\n\nx\n".encode(), queue_id=arrived_ago(age))
           for n in range(count)]
    wait_for(lambda: set(ids) <= set(daemon.files("deferred")), what="deferral")
    # filed before reported: until the supervisor hears of it, a hold would wait for the attempt's end
    daemon.wait_idle()
    return ids


@pytest.mark.parametrize("running", [True, False])
def test_list_shows_each_message_and_its_last_reply_as_text_and_json(daemons, running):
    daemon = daemons(*LATER)
    ids = deferred_mail(daemon, 3)
    if not running:
        assert daemon.stop() == 0
    code, out, _ = queue(daemon, "list")
    assert code == 0 and out.count("(try later)") == 3 and out.rstrip().endswith("-- 3 message(s)")
    assert all(re.search(rf"^{i}\s+\d+ \w{{3}} \w{{3}} \d\d [\d:]+  a@example.org$", out, re.M) for i in ids)
    code, out, _ = queue(daemon, "list", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert sorted(line["queue_id"] for line in lines) == sorted(ids)
    first = lines[0]
    assert {"queue_name", "queue_id", "arrival_time", "message_size", "forced_expire", "sender", "recipients",
            "attempts", "next_attempt"} <= set(first)
    assert first["forced_expire"] is False  # a script written for Postfix 3.7's postqueue -j reads it
    assert first["queue_name"] == "deferred" and first["attempts"] == 1 and first["next_attempt"] > time.time()
    assert first["recipients"][0]["delay_reason"] == "try later"
    assert set(first["recipients"][0]) >= {"address", "orig_address", "delay_reason"}


def test_selectors_combine(daemons, tmp_path):
    (tmp_path / "transports").write_text("slow.example queue/retry 4.2.1 421 too busy\n"
                                         "other.example queue/retry 4.7.1 greylisted\n")
    daemon = daemons("--transports", str(tmp_path / "transports"), "--min-backoff", "600")
    busy = deferred_mail(daemon, 2, "slow.example", age=3600)
    grey = deferred_mail(daemon, 1, "other.example", age=3600)
    mine = deferred_mail(daemon, 1, "slow.example", sender="b@example.org", age=3600)
    young = deferred_mail(daemon, 1, "slow.example")
    code, out, _ = queue(daemon, "hold", "--to-domain", "slow.example", "--older-than", "30m", "--reply", "421",
                         "--from", "a@example.org")
    assert code == 0 and sorted(re.findall(r"^(\S+): held$", out, re.M)) == sorted(busy)
    assert sorted(daemon.files("hold")) == sorted(busy)
    assert sorted(daemon.files("deferred")) == sorted(grey + mine + young)
    code, out, _ = queue(daemon, "list", "--destination", "queue/retry 4.7.1 greylisted",
                         "--transports", str(tmp_path / "transports"))
    assert grey[0] in out and busy[0] not in out and out.rstrip().endswith("-- 1 message(s)")


@pytest.mark.parametrize("running", [True, False])
def test_show_and_why_tell_everything_about_one_message(daemons, running):
    daemon = daemons(*LATER)
    [queue_id] = deferred_mail(daemon, 1)
    if not running:
        assert daemon.stop() == 0
    code, out, _ = queue(daemon, "show", queue_id)
    assert code == 0
    assert f"queue id:  {queue_id} (in deferred/)" in out and "recipient: <u0@example.com> pending 4.2.1" in out
    assert "attempt 1: 0 sent, 1 deferred, 0 bounced" in out and "Subject: 0" in out
    code, out, _ = queue(daemon, "why", queue_id, *LATER[:2])
    assert code == 0
    assert re.search(r"next attempt: in (9m\d\ds|10m0s) .*after attempt 1; it fails at max-age", out)
    assert "route now:   queue/retry 4.2.1 try later (default-transport)" in out
    assert "last reply:  try later (4.2.1)" in out
    assert ("the daemon is not running: nothing is tried until it starts" in out) is not running
    code, _, err = queue(daemon, "why", "66185E815C1AE-5A78-9")
    assert code == 1 and "no such message" in err


def test_show_keeps_the_body_of_a_crlf_message_for_body(daemons):
    """Every message from the SMTP front door has CRLF line ends: its header ends at CRLF CRLF."""
    daemon = daemons(*LATER)
    queue_id = Spool(daemon.spool).enqueue("a@example.org", ["u@example.com"],
                                           b"Subject: crlf\r\nX-Other: 1\r\n\r\nthe secret body\r\n")
    wait_for(lambda: queue_id in daemon.files("deferred"), what="deferral")
    code, out, _ = queue(daemon, "show", queue_id)
    assert code == 0 and "Subject: crlf" in out and "X-Other: 1" in out and "the secret body" not in out, out
    code, out, _ = queue(daemon, "show", "--body", queue_id)
    assert code == 0 and "the secret body" in out, out


@pytest.mark.parametrize("running", [True, False])
def test_flush_with_nothing_named_flushes_every_deferred_message(daemons, running):
    """As `postqueue -f`: a cron job or a habit types it bare."""
    daemon = daemons(*LATER)
    code, out, _ = queue(daemon, "flush")
    assert code == 0 and out == "flush: no message in deferred/\n", out
    ids = deferred_mail(daemon, 3)
    if not running:
        assert daemon.stop() == 0
    before = {queue_id: os.stat(daemon.spool / "deferred" / queue_id).st_mtime for queue_id in ids}
    code, out, _ = queue(daemon, "flush")
    assert code == 0 and sorted(re.findall(r"^(\S+): will be tried now$", out, re.M)) == sorted(ids), out
    if running:
        wait_for(lambda: all((data := contents(daemon.spool / "deferred" / queue_id)) and parse(data).attempts == 2
                             for queue_id in ids), what="the retries")
    else:
        assert all(os.stat(daemon.spool / "deferred" / queue_id).st_mtime < before[queue_id] for queue_id in ids)


@pytest.mark.parametrize("running", [True, False])
def test_hold_release_flush_requeue_delete(daemons, tmp_path, running):
    daemon = daemons(*LATER)
    ids = deferred_mail(daemon, 4)
    if not running:
        assert daemon.stop() == 0
    assert queue(daemon, "hold", ids[0])[0] == 0 and daemon.files("hold") == [ids[0]]
    assert queue(daemon, "release", ids[0])[0] == 0 and ids[0] not in daemon.files("hold")
    before = os.stat(daemon.spool / "deferred" / ids[1]).st_mtime
    code, out, _ = queue(daemon, "flush", ids[1])
    assert code == 0 and out == f"{ids[1]}: will be tried now\n"
    if running:  # tried again at once: a second attempt
        wait_for(lambda: (data := contents(daemon.spool / "deferred" / ids[1])) and parse(data).attempts == 2,
                 what="the retry")
    else:
        assert os.stat(daemon.spool / "deferred" / ids[1]).st_mtime < before
    code, out, _ = queue(daemon, "requeue", ids[2])
    assert code == 0 and "requeued" in out
    code, out, _ = queue(daemon, "delete", "--yes", ids[3], "66185E815C1AE-5A78-9", "../../etc/passwd")
    assert code == 1 and out == f"{ids[3]}: deleted\n"
    assert ids[3] not in daemon.files("deferred")
    if running:
        assert f"{ids[3]}: deleted (delete by uid 0)" in daemon.log()
        wait_for(lambda: ids[0] in daemon.files("deferred") and ids[2] in daemon.files("deferred"),
                 what="released and requeued mail tried again")


def test_requeue_killed_halfway_leaves_no_copy_and_loses_or_doubles_nothing(daemons):
    """`queue requeue` of 1,000 messages with the daemon stopped, killed (-9) while a rewritten
    copy is staged in tmp/: the next start removes that copy, and each message is delivered once."""
    daemon = daemons(start=False, workers=2)
    spool = Spool(daemon.spool)
    spool.create()
    count = 1000
    for n in range(count):
        queue_id = new_queue_id()
        spool.write(QueueFile(queue_id, arrival_of(queue_id), "a@example.org", [Recipient("u@example.org")],
                              f"Subject: {n}\n\nx\n".encode(), attempts=1, rewritten=True), "deferred")
    requeue = subprocess.Popen([sys.executable, "-m", "router", "queue", "requeue", "--all", "--queue-dir",
                                str(daemon.spool)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def stopped_with_a_copy_in_tmp() -> bool:
            """Stop the command; true if it is stopped halfway with a file staged, else let it go on."""
            requeue.send_signal(signal.SIGSTOP)
            if len(daemon.files("incoming")) > 10 and daemon.files("tmp"):
                return True
            requeue.send_signal(signal.SIGCONT)
            return False

        wait_for(stopped_with_a_copy_in_tmp, 60, "the requeue halfway, a copy staged in tmp/")
    finally:
        requeue.kill()
        requeue.wait()
    assert daemon.files("tmp") and daemon.files("deferred")  # killed halfway indeed
    daemon.start()
    wait_for(lambda: len(daemon.delivered()) >= count, 300, f"{count} deliveries")
    daemon.wait_idle(60)
    subjects = sorted(message_in(path).split(b"\n", 1)[0] for path in daemon.delivered())
    assert subjects == sorted(f"Subject: {n}".encode() for n in range(count))  # each once
    assert daemon.files("tmp") == daemon.files("deferred") == daemon.files("corrupt") == []


def test_ids_never_lead_out_of_the_spool(daemons, tmp_path):
    daemon = daemons(*LATER)
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    reply = json.loads(raw_request(daemon, {"command": "delete", "ids": ["../../victim", str(victim), "..", "/"]}))
    assert reply["done"] == {} and set(reply["failed"].values()) == {"not a queue id"}
    assert victim.read_text() == "keep me\n"


def test_delete_without_yes_off_a_terminal_refuses(daemons):
    daemon = daemons(*LATER)
    [queue_id] = deferred_mail(daemon, 1)
    code, _, err = queue(daemon, "delete", queue_id)
    assert code == 64 and "give --yes" in err and daemon.files("deferred") == [queue_id]
    held = deferred_mail(daemon, 1, "held.example")
    assert queue(daemon, "hold", *held)[0] == 0
    code, out, _ = queue(daemon, "delete", "--all-deferred", "--yes")
    assert code == 0 and out == f"{queue_id}: deleted\n"
    assert daemon.files("deferred") == [] and daemon.files("hold") == held


def test_only_root_and_the_daemon_user_change_the_queue(daemons, unix_users):
    daemon = daemons(*LATER, "--spool-group", EXTRA_GROUP)
    [queue_id] = deferred_mail(daemon, 1)
    result = qrouter("status", "--queue-dir", str(daemon.spool),
                     launcher_prefix=["setpriv", "--reuid", ALICE, "--regid", ALICE, "--init-groups"])
    assert result.returncode == 0 and "qrouter pid" in result.stdout.decode(), "reading is for the spool group"
    code, _, err = queue(daemon, "hold", queue_id, user=ALICE)
    assert code == 77 and "permission denied: only root and the daemon's user may hold messages" in err
    assert daemon.files("deferred") == [queue_id]
    code, _, _ = queue(daemon, "hold", queue_id, user=DAEMON_USER)
    assert code == 0 and daemon.files("hold") == [queue_id]


def test_a_user_who_may_not_open_the_spool_is_told_so_in_one_line(daemons, unix_users):
    """With the daemon stopped, what a user who cannot open the spool (mode 0700, the daemon
    user's) hears is why, in one line naming the spool, and exit 77 (EX_NOPERM)."""
    daemon = daemons(*LATER)
    [queue_id] = deferred_mail(daemon, 1)
    assert daemon.stop() == 0
    for args in (["delete", "--yes", queue_id], ["hold", queue_id], ["requeue", "--all"]):
        assert queue(daemon, *args, user=ALICE) == (
            77, "", f"qrouter: permission denied: {daemon.spool} (run as root or as user {DAEMON_USER})\n"), args
    assert daemon.files("deferred") == [queue_id]


@pytest.mark.parametrize("group", [False, True])
def test_a_user_who_may_not_read_the_spool_is_never_told_it_is_empty(daemons, unix_users, group):
    """Every view (list, show, why, shape, status, top, and the listing behind --all) says why it
    cannot look, exit 77, where it used to say the queue is empty or the daemon is not running."""
    daemon = daemons(*LATER, *(["--spool-group", EXTRA_GROUP] if group else []))
    [queue_id] = deferred_mail(daemon, 1)
    as_bob = ["setpriv", "--reuid", BOB, "--regid", BOB, "--init-groups"]  # in neither group
    who = f"a member of group {EXTRA_GROUP}" if group else f"user {DAEMON_USER}"
    config = ["--queue-dir", str(daemon.spool), *(["--spool-group", EXTRA_GROUP] if group else [])]
    for args in (["queue", "list"], ["queue", "show", queue_id], ["queue", "why", queue_id],
                 ["status", "--shape", "deferred"], ["status"], ["top"], ["queue", "flush", "--all"]):
        result = qrouter(*args, *config, launcher_prefix=as_bob)
        assert (result.returncode, result.stdout) == (77, b""), (args, result)
        assert result.stderr.decode() == f"qrouter: permission denied: {daemon.spool} (run as root or as {who})\n"
    if group:  # the group may look
        result = qrouter("queue", "list", *config, launcher_prefix=["setpriv", "--reuid", ALICE, "--regid", ALICE,
                                                                     "--init-groups"])
        assert result.returncode == 0 and queue_id in result.stdout.decode(), result


def test_a_message_being_delivered_is_held_after_its_attempt(daemons, tmp_path, world_dir):
    go = world_dir / "go"  # the attempt lasts until the test has asked for the hold, however long that takes
    slow = script(world_dir, "slow", f"cat >/dev/null; while [ ! -e {go} ]; do sleep 0.05; done; exit 75\n")
    (tmp_path / "transports").write_text(f"slow.example |{slow}\n")
    daemon = daemons("--transports", str(tmp_path / "transports"), "--min-backoff", "600")
    queue_id = Spool(daemon.spool).enqueue("a@example.org", ["x@slow.example"], b"x\n")
    wait_for(lambda: daemon.files("active") == [queue_id], what="the attempt")
    code, out, _ = queue(daemon, "hold", queue_id)
    go.touch()
    assert code == 0 and "held after this attempt" in out
    wait_for(lambda: daemon.files("hold") == [queue_id], what="held after the attempt")
    assert re.search(rf"{queue_id}: to=<x@slow.example>, .*status=deferred", daemon.log())


def raw_request(daemon, request) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(daemon.spool / "status.sock"))
        client.sendall((request if isinstance(request, bytes) else json.dumps(request).encode()) + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode()


@pytest.mark.parametrize("request_body", [
    {"command": "hold"}, {"command": "hold", "ids": "66185E815C1AE-5A78-1"}, {"command": "hold", "ids": [1, None, {}]},
    {"command": "rm -rf"}, {"command": ["hold"]}, {"ids": ["x"] * 100000, "command": "flush"},
    b'{"command": "hold", "ids": [' + b"[" * 5000 + b"]" * 5000 + b"]}", b"\xff\xfe", b"[]",
])
def test_malformed_requests_get_an_error_and_the_daemon_goes_on(daemons, request_body):
    daemon = daemons(*LATER)
    reply = json.loads(raw_request(daemon, request_body))
    assert "error" in reply or set(reply["failed"].values()) <= {"not a queue id"}
    assert daemon.process.poll() is None
    [queue_id] = deferred_mail(daemon, 1)
    assert queue_id in queue(daemon, "list")[1]


def test_status_shape_shows_domains_by_age_and_by_last_error(daemons):
    daemon = daemons(*LATER)
    deferred_mail(daemon, 3, "a.example")
    deferred_mail(daemon, 1, "b.example", sender="x@senders.example")
    result = qrouter("status", "--shape", "deferred", "--queue-dir", str(daemon.spool), check=True)
    lines = result.stdout.decode().splitlines()
    assert lines[0].split()[:4] == ["domain", "T", "5", "10"] and lines[0].split()[-1] == "1280+"
    assert lines[1].split()[:3] == ["TOTAL", "4", "4"]
    assert lines[2].split()[:2] == ["a.example", "3"] and lines[3].split()[:2] == ["b.example", "1"]
    assert any(line.split()[:2] == ["4.2.1", "4"] for line in lines)
    by_sender = qrouter("status", "--shape", "deferred", "--sender", "--queue-dir", str(daemon.spool),
                        check=True).stdout.decode()
    assert re.search(r"^example\.org\s+3 ", by_sender, re.M) and re.search(r"^senders\.example\s+1 ", by_sender, re.M)


def test_list_streams_a_large_queue(daemons, tmp_path):
    """The first line comes long before the last: messages are printed as they are found."""
    spool = Spool(tmp_path / "big")
    spool.create()
    for n in range(3000):
        spool.enqueue("a@example.org", [f"u{n}@example.com"], b"x\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "router", "queue", "list", "--queue", "incoming", "--queue-dir",
         str(tmp_path / "big")], stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])
    first = process.stdout.readline()
    assert re.match(rb"\S+-\S+-\S+ +\d+ ", first)
    rest = process.stdout.read()
    assert process.wait() == 0 and rest.rstrip().endswith(b"-- 3000 message(s)")


REQUESTS = st.one_of(
    st.binary(max_size=300).filter(lambda data: b"\n" not in data),
    st.builds(lambda command, ids: json.dumps({"command": command, "ids": ids}).encode(),
              st.sampled_from(["status", "flush", "hold", "release", "delete", "requeue", "", "x" * 50]),
              st.one_of(st.none(), st.text(max_size=30), st.lists(st.one_of(st.text(max_size=40), st.integers(),
                                                                          st.none()), max_size=20))),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                 max_leaves=20).map(lambda value: json.dumps(value).encode()),
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request_line=REQUESTS)
def test_fuzzed_requests_get_one_answer_and_change_nothing(daemons, request_line):
    """Whatever comes over the socket, the answer is one JSON line (an error, a status or a
    per-id result with nothing done to messages that do not exist), and the daemon goes on."""
    daemon = fuzzed_daemon(daemons)
    reply = json.loads(raw_request(daemon, request_line))
    assert isinstance(reply, dict)
    assert "error" in reply or "pid" in reply or reply["done"] == {}
    assert daemon.process.poll() is None
    assert daemon.files("deferred") == daemon.kept


def fuzzed_daemon(daemons):
    """One daemon, with one deferred message, for all the examples of one run of the fuzz test
    (the `daemons` fixture is made once for them all)."""
    if not hasattr(daemons, "fuzzed"):
        daemons.fuzzed = daemons(*LATER)
        daemons.fuzzed.kept = deferred_mail(daemons.fuzzed, 1)
    return daemons.fuzzed
