"""Local delivery through the real daemon: real maildrop and procmail from Debian, run as real
unix users the aliases file names; pipes into programs as pipe users; Return-Path: and
Delivered-To:, the 5.4.6 loop, exit codes, time limits and hostile addresses; a message with
both local and remote recipients split between the two kinds of worker."""

from __future__ import annotations

import os
import pwd
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

from router.spool import Spool
from tests.daemon import DAEMON_USER, qrouter, wait_for
from tests.unix_users import ALICE, BOB, owned_dir, script

MESSAGE = b"Subject: local delivery\n\nhello from far away\n"


def policy(tmp_path: Path, transports: str, aliases: str = "") -> list[str]:
    (tmp_path / "transports").write_text(transports)
    args = ["--transports", str(tmp_path / "transports")]
    if aliases:
        (tmp_path / "aliases").write_text(aliases)
        args += ["--aliases", str(tmp_path / "aliases")]
    return args


def enqueue(daemon, *recipients: str, message: bytes = MESSAGE, sender: str = "sender@example.org") -> str:
    return qrouter("enqueue", "--queue-dir", str(daemon.spool), "-f", sender, "--", *recipients,
                   stdin=message, check=True).stdout.decode().strip()


def logged(daemon, pattern: str, timeout: float = 20) -> re.Match:
    return wait_for(lambda: re.search(pattern, daemon.log()), timeout=timeout, what=pattern)


def home_maildir(account, name: str = "Maildir") -> Path:
    """An empty Maildir in the user's home, theirs."""
    maildir = Path(account.home) / name
    for sub in ("", "tmp", "new", "cur"):
        (maildir / sub).mkdir(mode=0o700, exist_ok=True)
        os.chown(maildir / sub, account.uid, account.gid)
    for old in (maildir / "new").iterdir():
        old.unlink()
    return maildir


def users_file(account, name: str, text: str) -> None:
    path = Path(account.home) / name
    path.write_text(text)
    path.chmod(0o600)
    os.chown(path, account.uid, account.gid)


ALIASES = f"root {BOB}\nalice {ALICE}\nbob {BOB}\n"


def test_maildrop_delivers_as_the_aliased_user_into_their_maildir(daemons, tmp_path, unix_users):
    alice = unix_users[ALICE]
    maildir = home_maildir(alice)
    users_file(alice, ".mailfilter", 'to "$HOME/Maildir/"\n')
    daemon = daemons(*policy(tmp_path, "local.example /usr/bin/maildrop -f ${sender}\n", ALIASES))
    queue_id = enqueue(daemon, "Alice@local.example")
    [delivered] = wait_for(lambda: list((maildir / "new").iterdir()), what="maildrop's delivery")
    content = delivered.read_bytes()
    assert content.startswith(b"Return-Path: <sender@example.org>\nDelivered-To: Alice@local.example\nReceived: ")
    assert content.endswith(MESSAGE)
    assert delivered.stat().st_uid == alice.uid  # its group is mail: Debian's maildrop is set-group-id mail
    logged(daemon, rf"qrouter/local\[\d+\]: {queue_id}: to=<Alice@local.example>, "
                   rf"relay=local\[{ALICE}:/usr/bin/maildrop\], delay=[\d.]+, delays=[\d./]+, dsn=2\.0\.0, "
                   r"status=sent \(.*\), attempts=1\n")


def test_procmail_gets_the_extension_and_writes_the_users_mbox(daemons, tmp_path, unix_users):
    bob = unix_users[BOB]
    for mbox in ("lists", "inbox"):
        (Path(bob.home) / mbox).unlink(missing_ok=True)
    users_file(bob, ".procmailrc", "DEFAULT=$HOME/inbox\nEXT=$1\n:0:\n* EXT ?? ^^lists^^\n$HOME/lists\n")
    daemon = daemons(*policy(tmp_path, "local.example /usr/bin/procmail -f ${sender} -a ${extension}\n", ALIASES))
    enqueue(daemon, "bob+lists@local.example", "bob@local.example")
    lists, inbox = Path(bob.home) / "lists", Path(bob.home) / "inbox"
    wait_for(lambda: lists.exists() and inbox.exists() and MESSAGE in inbox.read_bytes(), what="both mboxes")
    assert lists.read_bytes().startswith(b"From sender@example.org ")
    assert b"\nDelivered-To: bob+lists@local.example\n" in lists.read_bytes()
    assert b"\nDelivered-To: bob@local.example\n" in inbox.read_bytes()
    assert lists.stat().st_uid == bob.uid


def test_agent_runs_as_the_user_with_a_clean_environment_and_exact_argv(daemons, tmp_path, unix_users, world_dir):
    alice = unix_users[ALICE]
    out = owned_dir(world_dir, alice)
    recorder = script(world_dir, "record", f"""cd "$PWD"
id -u > {out}/uid; id -g > {out}/gid; id -G > {out}/groups; pwd > {out}/cwd
tr '\\0' '\\n' < /proc/$$/environ > {out}/env
grep -E '^Cap(Eff|Prm|Inh|Amb)' /proc/$$/status > {out}/caps
for arg in "$@"; do printf '%s\\n' "$arg"; done > {out}/argv
cat > {out}/stdin
""")
    daemon = daemons(*policy(tmp_path, f"local.example {recorder} -f ${{sender}} ${{user}} ${{extension}}\n",
                             ALIASES + f"x.* {ALICE}\n"))
    queue_id = enqueue(daemon, "x+tag@local.example", sender="")
    wait_for(lambda: (out / "stdin").exists() and (out / "stdin").stat().st_size, what="the recorder")
    assert (out / "uid").read_text().split() == [str(alice.uid)]
    assert (out / "gid").read_text().split() == [str(alice.gid)]
    assert sorted(map(int, (out / "groups").read_text().split())) == sorted({alice.gid, *alice.groups})
    assert (out / "cwd").read_text().strip() == alice.home
    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines())
    assert env == {"HOME": alice.home, "USER": ALICE, "LOGNAME": ALICE, "SHELL": alice.shell,
                   "PATH": "/usr/local/bin:/usr/bin:/bin", "SENDER": "", "RECIPIENT": "x+tag@local.example",
                   "ORIGINAL_RECIPIENT": "x+tag@local.example", "DOMAIN": "local.example", "LOCAL": "x+tag",
                   "EXTENSION": "tag", "QUEUE_ID": queue_id}
    assert all(line.split()[1] == "0000000000000000" for line in (out / "caps").read_text().splitlines())
    assert (out / "argv").read_text().splitlines() == ["-f", "", "x", "tag"]
    assert (out / "stdin").read_bytes().startswith(b"Return-Path: <>\nDelivered-To: x+tag@local.example\n")


def test_a_message_that_was_delivered_here_before_is_a_loop(daemons, tmp_path, unix_users):
    alice = unix_users[ALICE]
    maildir = home_maildir(alice)
    users_file(alice, ".mailfilter", 'to "$HOME/Maildir/"\n')
    daemon = daemons(*policy(tmp_path, "local.example /usr/bin/maildrop\n", ALIASES))
    looped = b"Delivered-To: alice@local.example\n" + MESSAGE
    queue_id = enqueue(daemon, "alice@local.example", message=looped)
    logged(daemon, rf"{queue_id}: to=<alice@local.example>, .*dsn=5\.4\.6, status=bounced \(mail forwarding loop")
    daemon.wait_idle()
    assert not list((maildir / "new").iterdir())


@pytest.mark.parametrize(("body", "status", "dsn", "reply"), [
    ("exit 67", "bounced", "5.1.1", r"/\S+/agent exited with status 67 \(EX_NOUSER\)"),
    ("echo '5.2.2 mailbox full, sorry'; exit 1", "bounced", "5.2.2", "mailbox full, sorry"),
    ("echo 'over quota'; exit 75", "deferred", "4.3.0", "over quota"),
    ("echo 'all is well'", "sent", "2.0.0", "all is well"),
])
def test_how_the_program_ends_decides_the_outcome(daemons, tmp_path, unix_users, world_dir, body, status, dsn, reply):
    program = script(world_dir, "agent", f"cat >/dev/null\n{body}\n")
    daemon = daemons(*policy(tmp_path, f"pipe.example |user={BOB} {program}\n"))
    queue_id = enqueue(daemon, "robot@pipe.example")
    logged(daemon, rf"qrouter/pipe\[\d+\]: {queue_id}: to=<robot@pipe.example>, relay=pipe\[{BOB}:{program}\], .*"
                   rf"dsn={re.escape(dsn)}, "
                   rf"status={status} \({reply}")
    if status == "deferred":
        wait_for(lambda: daemon.files("deferred") == [queue_id], what="deferred/")
        assert f"reply {reply}" in (daemon.spool / "deferred" / queue_id).read_text()


HOSTILE = ['"a;touch /tmp/qrtest-x"@pipe.example', '"x$(touch /tmp/qrtest-y)"@pipe.example',
           "`touch${IFS}/tmp/qrtest-z`@pipe.example", '"a b\'c\\"d"@pipe.example', "-rf@pipe.example"]


def test_hostile_addresses_are_only_text_to_a_pipe(daemons, tmp_path, unix_users, world_dir):
    out = owned_dir(world_dir, unix_users[BOB])
    recorder = script(world_dir, "robot",
                      f'cat >/dev/null\nfor arg in "$@"; do printf "%s\\n" "$arg"; done >> {out}/argv\n')
    for name in ("x", "y", "z"):
        Path(f"/tmp/qrtest-{name}").unlink(missing_ok=True)
    daemon = daemons(*policy(tmp_path, f"pipe.example |user={BOB} per=message {recorder} --to ${{recipient}}\n"))
    queue_id = enqueue(daemon, *HOSTILE)
    for address in HOSTILE:
        logged(daemon, rf"{queue_id}: to=<{re.escape(address)}>, .*status=sent")
    lines = (out / "argv").read_text().splitlines()
    assert lines == ["--to", *HOSTILE], "one run, every address one argument, byte for byte"
    assert not any(Path(f"/tmp/qrtest-{name}").exists() for name in ("x", "y", "z"))


def test_pipe_runs_as_pipe_user_one_run_per_recipient(daemons, tmp_path, world_dir):
    out = world_dir / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    recorder = script(world_dir, "robot", f'cat >/dev/null\necho "$(id -un) $RECIPIENT $1" >> {out}/runs\n')
    daemon = daemons(*policy(tmp_path, f"pipe.example |{recorder} ${{mailbox}}\n"))
    enqueue(daemon, "one@pipe.example", "two@pipe.example")
    wait_for(lambda: (out / "runs").exists() and len((out / "runs").read_text().splitlines()) == 2, what="2 runs")
    assert sorted((out / "runs").read_text().splitlines()) == ["nobody one@pipe.example one",
                                                               "nobody two@pipe.example two"]


def test_a_program_past_its_time_limit_is_killed_and_the_worker_goes_on(daemons, tmp_path, world_dir):
    marks = world_dir / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    sleeper = script(world_dir, "sleeper", f"sleep 60 & echo $! > {marks}/child\nwait\n")
    fast = script(world_dir, "fast", "cat >/dev/null\n")
    # a limit of a few seconds: on a loaded machine the program may take one to start its child
    daemon = daemons(*policy(tmp_path, f"slow.example |{sleeper}\nfast.example |{fast}\n"),
                     "--command-time-limit", "3")
    [local_worker] = [w["pid"] for w in daemon.status()["workers"] if w["pool"] == "local"]
    queue_id = enqueue(daemon, "x@slow.example")
    logged(daemon, rf"{queue_id}: to=<x@slow.example>, .*dsn=5\.3\.0, status=bounced \(command time limit of 3s "
                   rf"exceeded: {sleeper}")
    child = int((marks / "child").read_text())
    wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
             what="the program's own child killed with it")
    second = enqueue(daemon, "y@fast.example")
    logged(daemon, rf"{second}: to=<y@fast.example>, .*status=sent")
    assert [w["pid"] for w in daemon.status()["workers"] if w["pool"] == "local"] == [local_worker]


def test_hostile_programs_leave_the_worker_healthy(daemons, tmp_path, world_dir):
    programs = {
        "mute": "exit 0\n",  # never reads its stdin
        "flood": "head -c 52428800 /dev/zero | tr '\\0' x; head -c 52428800 /dev/zero | tr '\\0' y >&2\n",
        "detach": "cat >/dev/null; sleep 30 &\nexit 0\n",  # a child keeps the output pipe open
    }
    lines = "".join(f"{name}.example |{script(world_dir, name, body)}\n" for name, body in programs.items())
    daemon = daemons(*policy(tmp_path, lines))
    big = MESSAGE + b"x" * (5 << 20) + b"\n"
    ids = {name: enqueue(daemon, f"r@{name}.example", message=big if name == "mute" else MESSAGE) for name in programs}
    for name, queue_id in ids.items():
        logged(daemon, rf"{queue_id}: to=<r@{name}.example>, .*status=sent \(")
    [local] = [w for w in daemon.status()["workers"] if w["pool"] == "local"]
    assert local["rss"] < 120 << 20, f"the local worker grew to {local['rss'] >> 20} MB"
    flood = re.search(rf"{ids['flood']}: to=.*status=sent \((.*)\), attempts=1$", daemon.log(), re.MULTILINE)[1]
    assert flood.startswith("xxxx") and len(flood) <= 200


def started_by(queue_id: str, uid: int) -> list[int]:
    """The live processes, run as `uid`, that a delivery of `queue_id` started, found in /proc:
    every program gets QUEUE_ID in its environment, and what it starts inherits it (a zombie has
    no environment left, and is no longer running)."""
    mark = f"QUEUE_ID={queue_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            uids = re.search(r"^Uid:\s+(\d+)", (entry / "status").read_text(), re.MULTILINE)[1]
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if int(uids) == uid and mark in environ:
            found.append(int(entry.name))
    return found


class Leftovers:
    """What the deliveries of watched messages left running, found in /proc; at the end of the
    test all of it is killed, so that a test that fails leaves no program running for minutes."""

    def __init__(self) -> None:
        self.watched: dict[str, int] = {}

    def watch(self, queue_id: str, uid: int) -> str:
        self.watched[queue_id] = uid
        return queue_id

    def __call__(self, queue_id: str) -> list[int]:
        return started_by(queue_id, self.watched[queue_id])

    def kill(self) -> None:
        for queue_id in self.watched:
            for pid in self(queue_id):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def left_behind() -> Iterator[Leftovers]:
    leftovers = Leftovers()
    yield leftovers
    leftovers.kill()


QUIET = "</dev/null >/dev/null 2>&1"  # a child that holds none of the program's pipes: nothing waits for it


def test_nothing_a_program_starts_outlives_its_delivery(daemons, tmp_path, unix_users, world_dir, left_behind):
    """Programs run as the aliased user leave a child in the background, one in a session of its
    own (setsid), one that ignores SIGTERM (it gets SIGTERM first, SIGKILL after a grace), and
    one that calls setsid and then overstays the time limit. When each delivery is logged, none
    of its processes is left, and the message was delivered as before. All the while, in the
    same worker, a run of the same user waits for a helper it left in the background: ending the
    others' processes does not touch it."""
    bob = unix_users[BOB]
    out = owned_dir(world_dir, bob)
    programs = {  # "late" first: the test ends when its time limit does
        "late": f"setsid -f sleep 300 {QUIET}; sleep 300",
        "background": f"sleep 300 {QUIET} &",
        "setsid": f"setsid -f sleep 300 {QUIET}",
        "stubborn": f"sh -c 'trap \"echo TERM >> {out}/signals\" TERM; touch {out}/trapped; while :; do sleep 1; done' "
                    f"{QUIET} &\nuntil [ -e {out}/trapped ]; do sleep 0.05; done",  # SIGTERM only once it is trapped
        "patient": f"( (until [ -e {out}/go ]; do sleep 0.1; done; echo alive > {out}/helper) {QUIET} & )\n"
                   f"until [ -e {out}/helper ]; do sleep 0.1; done",
    }
    scripts = {name: script(world_dir, name, f"cat > {out}/{name}\n{body}\n") for name, body in programs.items()}
    rules = "".join(f"{name}.example |user={BOB} {path}\n" for name, path in scripts.items())
    # The patient runs while the others are delivered and their leftovers killed (seconds, more
    # under load): the time limit must leave it that long, and "late" overstays it.
    daemon = daemons(*policy(tmp_path, rules), "--command-time-limit", "30")
    patient = left_behind.watch(enqueue(daemon, "r@patient.example"), bob.uid)
    wait_for(lambda: (out / "patient").exists(), what="the patient program")
    ids = {name: left_behind.watch(enqueue(daemon, f"r@{name}.example"), bob.uid)
           for name in programs if name != "patient"}
    for name in ("background", "setsid", "stubborn"):
        logged(daemon, rf"{ids[name]}: to=<r@{name}.example>, relay=pipe\[{BOB}:.*status=sent")
        assert left_behind(ids[name]) == [], name
        assert (out / name).read_bytes().startswith(b"Return-Path: <sender@example.org>\n")
        assert (out / name).read_bytes().endswith(MESSAGE)
    assert (out / "signals").read_text() == "TERM\n", "SIGTERM first, then SIGKILL"
    (out / "go").touch()
    logged(daemon, rf"{patient}: to=<r@patient.example>, .*status=sent")
    assert (out / "helper").read_text() == "alive\n"
    assert left_behind(patient) == []
    logged(daemon, rf"{ids['late']}: to=<r@late.example>, .*dsn=5\.3\.0, status=bounced \(command time limit of "
                   r"30s exceeded", timeout=60)
    assert left_behind(ids["late"]) == []
    assert (out / "late").read_bytes().endswith(MESSAGE)


def test_a_worker_killed_mid_delivery_takes_what_the_program_started_with_it(daemons, tmp_path, unix_users,
                                                                              world_dir, left_behind):
    """The local worker is killed (kill -9) while a program and the children it started, one of
    them in a session of its own and one that ignores SIGTERM, run: the replacement worker
    delivers the message, and none of them is left."""
    bob = unix_users[BOB]
    out = owned_dir(world_dir, bob)
    program = script(world_dir, "robot", f"""[ -e {out}/tried ] && exec cat > {out}/message
setsid -f sleep 300 {QUIET}
sh -c 'trap "" TERM; sleep 300' {QUIET} &
touch {out}/tried
sleep 300
""")
    daemon = daemons(*policy(tmp_path, f"pipe.example |user={BOB} {program}\n"))
    up = time.monotonic()  # the workers started before the daemon said it had
    queue_id = left_behind.watch(enqueue(daemon, "r@pipe.example"), bob.uid)
    wait_for(lambda: (out / "tried").exists(), what="the first run")
    wait_for(lambda: len(left_behind(queue_id)) >= 4, what="the program and the children it started")
    [worker] = [w["pid"] for w in daemon.status()["workers"] if w["pool"] == "local"]
    # one that dies in its first second is replaced a second later, not at once, and meanwhile its
    # message would wait in its destination's line until another delivery there ends
    wait_for(lambda: time.monotonic() - up > 1.5, what="a worker past its first second")
    os.kill(worker, signal.SIGKILL)
    logged(daemon, rf"{queue_id}: to=<r@pipe.example>, .*status=sent")
    assert (out / "message").read_bytes().endswith(MESSAGE)
    wait_for(lambda: not left_behind(queue_id), what="the first run's processes ended (SIGKILL 2s after SIGTERM)")


def test_a_program_that_defers_forever_expires_at_max_age(daemons, tmp_path, world_dir):
    program = script(world_dir, "busy", "cat >/dev/null; echo 'try again later'; exit 75\n")
    daemon = daemons(*policy(tmp_path, f"pipe.example |{program}\n"), "--max-age", "0.00003",
                     "--min-backoff", "0.5", "--max-backoff", "0.5")
    queue_id = enqueue(daemon, "r@pipe.example")
    logged(daemon, rf"{queue_id}: to=<r@pipe.example>, .*dsn=4\.3\.0, status=deferred \(try again later\)")
    logged(daemon, rf"{queue_id}: to=<r@pipe.example>, .*dsn=4\.4\.7, status=expired \(message expired .*"
                   r"last error: try again later\)")


def test_local_and_remote_recipients_are_split_between_the_two_kinds_of_worker(daemons, tmp_path, world_dir):
    out = world_dir / "out"
    out.mkdir()
    out.chmod(0o777)
    robot = script(world_dir, "robot", f"cat > {out}/message\n")
    daemon = daemons(*policy(tmp_path, f"pipe.example |{robot}\n"), "--default-transport",
                     f"queue/maildir {tmp_path}/mail/%d/%u")
    queue_id = enqueue(daemon, "robot@pipe.example", "user@example.org")
    part = logged(daemon, rf"{queue_id}: to=<robot@pipe.example>, relay=local\[(\w+-\w+-\d+)\], .*status=sent "
                          r"\(forwarded as \1 to the local workers\)")[1]
    logged(daemon, rf"{part}: to=<robot@pipe.example>, relay=pipe\[nobody:{robot}\], .*status=sent")
    wait_for(lambda: daemon.delivered("example.org/user"), what="the Maildir delivery")
    assert (out / "message").read_bytes().endswith(MESSAGE)
    assert (out / "message").read_bytes().startswith(b"Return-Path: <sender@example.org>\n"
                                                     b"Delivered-To: robot@pipe.example\n")


def test_route_shows_what_an_agent_would_run_with(tmp_path, unix_users):
    args = policy(tmp_path, "local.example /usr/bin/procmail -f ${sender} -a ${extension}\n", ALIASES)
    shown = qrouter("route", *args, "--from", "s@example.org", "bob+news@local.example", check=True).stdout.decode()
    bob = unix_users[BOB]
    assert 'argv:      ["/usr/bin/procmail", "-f", "s@example.org", "-a", "news"]' in shown
    assert f"runs as:   {BOB} (uid {bob.uid}, gid {bob.gid}" in shown and f"in {bob.home}" in shown
    assert "time limit: 1000s, one run per recipient" in shown
    assert "  RECIPIENT=bob+news@local.example" in shown and "  EXTENSION=news" in shown


def test_rules_that_would_run_as_root_or_as_the_daemon_itself_are_refused(tmp_path):
    for line, error in (("x.example |user=root /bin/cat\n", "never runs as root"),
                        (f"x.example |user={DAEMON_USER} /bin/cat\n", "never runs as qrouter's own user"),
                        ("x.example |/bin/cat ${nonsense}\n", "unknown placeholder ${nonsense}"),
                        ("x.example |/bin/cat 'unclosed\n", "No closing quotation"),
                        ("x.example |cat\n", "must be an absolute path")):
        result = qrouter("check-config", *policy(tmp_path, line))
        assert result.returncode == 78, line
        assert f"{tmp_path / 'transports'}:1: " in result.stderr.decode() and error in result.stderr.decode()


def test_as_a_normal_user_agents_can_run_only_as_that_user(tmp_path, unix_users):
    args = policy(tmp_path, "local.example /usr/bin/maildrop\n", ALIASES)
    tmp_path.joinpath("transports").chmod(0o644)
    as_bob = ["setpriv", "--reuid", BOB, "--regid", BOB, "--init-groups"]
    result = qrouter("check-config", *args, launcher_prefix=as_bob)
    assert result.returncode == 78
    assert f"{tmp_path / 'aliases'}:2: local delivery would run as '{ALICE}', but qrouter runs as '{BOB}'" \
        in result.stderr.decode()


def test_started_as_root_every_process_is_the_daemon_user_and_only_local_workers_may_switch(
        daemons, tmp_path, world_dir):
    daemon = daemons(*policy(tmp_path, f"pipe.example |{script(world_dir, 'robot', 'cat >/dev/null')}\n"))

    def caps(pid: int) -> dict[str, str]:
        return dict(line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith(("Cap", "NoNewPrivs")))

    def started() -> dict:
        """The status once every worker is past its change of privileges, the first thing it does
        once forked (workers/worker.py): a network worker sets no_new_privs last, a local one makes
        its capabilities effective."""
        status = daemon.status()
        return all(caps(w["pid"])["NoNewPrivs"] == "1" if w["pool"] == "network" else int(caps(w["pid"])["CapEff"], 16)
                   for w in status["workers"]) and status

    status = wait_for(started, what="every worker past its change of privileges")
    uid = int(os.popen(f"id -u {DAEMON_USER}").read())
    processes = {"supervisor": status["pid"], **{f"{w['pool']}-{w['pid']}": w["pid"] for w in status["workers"]}}
    assert {name.split("-")[0] for name in processes} == {"supervisor", "network", "local"}
    for name, pid in processes.items():
        assert psutil.Process(pid).uids() == (uid, uid, uid), name
        caps_now = caps(pid)
        effective, permitted = int(caps_now["CapEff"], 16), int(caps_now["CapPrm"], 16)
        kind = name.split("-")[0]
        if kind == "network":
            assert (effective, permitted, caps_now["NoNewPrivs"]) == (0, 0, "1"), "an SMTP worker can never setuid"
        elif kind == "local":
            assert effective == permitted == 0xE0, "CAP_SETUID, CAP_SETGID and CAP_KILL only"
        else:
            assert (effective, permitted) == (0, 0xE0), "kept, not used"
    assert all(p.stat().st_uid == uid for p in [daemon.spool, *daemon.spool.iterdir()])
    shown = qrouter("status", "--queue-dir", str(daemon.spool), check=True).stdout.decode()
    assert {line.split()[1] for line in shown.splitlines() if re.match(r"\s+\d+  ", line)} == {"network", "local"}
    daemon.signal(signal.SIGTERM)
    assert daemon.process.wait(30) == 0


def test_started_as_root_without_the_daemon_user_it_refuses(daemons, tmp_path):
    daemon = daemons("--user", "qrtest-nosuchuser", start=False).start(wait=False)
    assert daemon.process.wait(30) == 1
    assert "cannot start: started as root, but the unprivileged user 'qrtest-nosuchuser'" in daemon.log()


def test_the_watchdog_lets_a_long_run_finish_and_replaces_a_worker_that_hangs(daemons, tmp_path, world_dir):
    """A program may run for its whole time limit, far longer than the watchdog's 15 s: the
    worker still says it is alive. A worker that stops (here: SIGSTOP) is killed and replaced,
    and the message it held is delivered by another."""
    marks = world_dir / "marks"
    marks.mkdir(mode=0o777)
    marks.chmod(0o777)
    slow = script(world_dir, "slow", "cat >/dev/null; sleep 17\n")
    stuck = script(world_dir, "stuck", f"cat >/dev/null; [ -e {marks}/tried ] && exit 0; touch {marks}/tried; "
                                       "sleep 100\n")
    daemon = daemons(*policy(tmp_path, f"slow.example |{slow}\nstuck.example |{stuck}\n"),
                     "--local-workers", "2", "--command-time-limit", "60")
    long_run = enqueue(daemon, "r@slow.example")
    [runner] = wait_for(lambda: [w["pid"] for w in daemon.status()["workers"] if w["queue_id"] == long_run],
                        what="the long run")
    hung = enqueue(daemon, "r@stuck.example")
    wait_for(lambda: (marks / "tried").exists(), what="the program that hangs")
    [frozen] = [w["pid"] for w in daemon.status()["workers"] if w["queue_id"] == hung]
    os.kill(frozen, signal.SIGSTOP)
    logged(daemon, rf"worker {frozen} has not answered for \d+s; killing it", timeout=40)
    logged(daemon, rf"{hung}: to=<r@stuck\.example>, .*status=sent")
    logged(daemon, rf"{long_run}: to=<r@slow\.example>, .*delay=(1[7-9]|2\d)\.\d+, .*status=sent")  # not killed at 15
    silent = re.findall(r"worker (\d+) has not answered for", daemon.log())
    assert silent.count(str(frozen)) == 2, "take-back and kill of the frozen worker"
    assert str(runner) not in silent, "the long run's worker said it was alive all along"


def test_a_spool_written_by_root_is_given_to_the_daemon_user_at_start(daemons):
    """A spool an earlier version wrote as root: the daemon, started as root, gives it to its user
    before it becomes that user, and delivers what waits there."""
    daemon = daemons(start=False)
    spool = Spool(daemon.spool)
    spool.create()
    queue_id = spool.enqueue("a@example.org", ["u@example.org"], b"Subject: old\n\nwaiting\n")
    assert (daemon.spool / "incoming" / queue_id).stat().st_uid == 0
    daemon.start()
    assert re.search(r"running as user qrouter \(uid \d+\); the spool belongs to it \(\d+ files and directories "
                     r"given to it\)", daemon.log())
    wait_for(lambda: daemon.delivered("example.org/u"), what="the waiting message delivered")
    uid = pwd.getpwnam(DAEMON_USER).pw_uid
    assert all(path.stat().st_uid == uid for path in daemon.spool.rglob("*") if not path.is_socket())


def test_started_as_a_normal_user_agents_run_as_that_user_only(daemons, tmp_path, unix_users, world_dir):
    """`make run` as oneself: the daemon refuses, naming the line, a rule that needs another
    user; and runs agents as its own user."""
    as_bob = ["setpriv", "--reuid", BOB, "--regid", BOB, "--init-groups", sys.executable, "-m", "router"]
    args = policy(tmp_path, "local.example /usr/bin/maildrop\n", ALIASES)
    refused = daemons(*args, launcher=as_bob, start=False).start(wait=False)
    assert refused.process.wait(30) == 1
    assert f"{tmp_path / 'aliases'}:2: local delivery would run as '{ALICE}', but qrouter runs as '{BOB}'" \
        in refused.log()
    out = owned_dir(world_dir, unix_users[BOB])
    robot = script(world_dir, "robot", f"cat >/dev/null; id -un > {out}/who\n")
    daemon = daemons(*policy(tmp_path, f"pipe.example |{robot}\n"), launcher=as_bob)
    assert psutil.Process(daemon.status()["pid"]).uids().real == unix_users[BOB].uid
    enqueue(daemon, "r@pipe.example")
    wait_for(lambda: (out / "who").exists() and (out / "who").read_text(), what="the robot's run")
    assert (out / "who").read_text().strip() == BOB
