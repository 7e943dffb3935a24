"""workers/command.py: real programs run as real unix users, as maildrop or a pipe program would
be, and what the worker and the mail's sender see of it: who the program runs as and with what,
that the message and the arguments arrive byte for byte, how its exit becomes a delivery result,
and that no program, however hostile, can hang the worker, grow its memory or outlive its time
limit.

The programs are /bin/sh scripts in a directory every user can reach (tests/unix_users.py).
"""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.unix_users import ALICE, BOB, EXTRA_GROUP, owned_dir, script
from workers.command import REPLY_CHARS, Account, Command, Result, environment, longest_run, run, verdict, workdir
from workers.transport import BOUNCED, DEFERRED, SENT

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


def command(argv: list[str] | str, account: Account, env: dict[str, str] | None = None,
            time_limit: float = 10.0) -> Command:
    return Command(tuple([argv] if isinstance(argv, str) else argv), account, env or {}, time_limit)


def timed(cmd: Command, message: bytes = MESSAGE) -> tuple[Result, float]:
    start = time.monotonic()
    result = run(cmd, message)
    return result, time.monotonic() - start


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# -- who the program is and what it gets ---------------------------------------------------------

def test_a_program_runs_as_the_account_in_its_home_with_nothing_of_ours(unix_users, world_dir, monkeypatch):
    """Its uid, gid and groups (with the supplementary one), its home as working directory, the
    documented environment and no other variable, umask 077, no capabilities and none of our files."""
    alice = unix_users[ALICE]
    out = owned_dir(world_dir, alice)
    monkeypatch.setenv("QRTEST_SECRET", "the worker's own")
    secret = os.open(world_dir, os.O_RDONLY)  # a descriptor a careless fork would hand on
    os.set_inheritable(secret, True)
    prog = script(world_dir, "record", f"""out={out}
id -u > $out/uid; id -g > $out/gid; id -G > $out/groups; pwd > $out/cwd; umask > $out/umask
cat /proc/$$/environ > $out/environ
grep ^Cap /proc/$$/status > $out/caps
fds=$(for fd in /proc/$$/fd/*; do readlink $fd; done); echo "$fds" > $out/fds
echo recorded
""")
    try:
        result = run(command(prog, alice, {"SENDER": "a@example.org", "RECIPIENT": "alice@example.org"}), MESSAGE)
    finally:
        os.close(secret)

    assert result == Result(SENT, "2.0.0", "recorded")
    assert int((out / "uid").read_text()) == alice.uid
    assert int((out / "gid").read_text()) == alice.gid
    groups = {int(gid) for gid in (out / "groups").read_text().split()}
    assert groups == set(alice.groups)
    assert grp.getgrnam(EXTRA_GROUP).gr_gid in groups
    assert (out / "cwd").read_text().strip() == alice.home
    assert (out / "umask").read_text().strip() == "0077"
    variables = dict(entry.split("=", 1) for entry in (out / "environ").read_text().split("\0") if entry)
    assert variables == {"HOME": alice.home, "USER": ALICE, "LOGNAME": ALICE, "SHELL": "/bin/sh",
                         "PATH": "/usr/local/bin:/usr/bin:/bin",
                         "SENDER": "a@example.org", "RECIPIENT": "alice@example.org"}
    caps = dict(line.split(":\t") for line in (out / "caps").read_text().splitlines())
    assert {name: int(value, 16) for name, value in caps.items() if name != "CapBnd"} == {
        "CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}
    files = set((out / "fds").read_text().split())
    assert str(world_dir) not in files
    assert {name for name in files if not name.startswith("pipe:")} <= {prog}  # sh keeps its script open


def test_extra_variables_come_on_top_of_the_accounts(unix_users):
    alice = unix_users[ALICE]
    env = environment(alice, {"SENDER": "", "HOME": "/elsewhere"})
    assert env == {"HOME": "/elsewhere", "USER": ALICE, "LOGNAME": ALICE, "SHELL": "/bin/sh",
                   "PATH": "/usr/local/bin:/usr/bin:/bin", "SENDER": ""}


def test_accounts_come_from_the_passwd_file(unix_users):
    alice = Account.named(ALICE)
    assert (alice.name, alice.home, alice.shell) == (ALICE, f"/home/{ALICE}", "/bin/sh")
    assert grp.getgrnam(EXTRA_GROUP).gr_gid in alice.groups
    for name in ("qrtest-nobody-such", "qrtest-alice\0root", ""):
        with pytest.raises(LookupError, match=re.escape(f"no such unix user {name!r}")):
            Account.named(name)


@pytest.mark.parametrize("home", ["missing", "a file", "closed to the account", "relative"])
def test_a_home_the_account_cannot_enter_means_working_in_the_root_directory(unix_users, world_dir, home):
    bob = unix_users[BOB]
    out = owned_dir(world_dir, bob)
    place = {"missing": world_dir / "nowhere", "a file": world_dir / "file",
             "closed to the account": world_dir / "closed", "relative": Path("home/bob")}[home]
    (world_dir / "file").write_text("")
    (world_dir / "closed").mkdir(mode=0o700)
    prog = script(world_dir, "pwd", f"pwd > {out}/cwd\n")
    homeless = dataclasses.replace(bob, home=str(place))
    result = run(command(prog, homeless), MESSAGE)
    assert result.status == SENT
    assert (out / "cwd").read_text().strip() == workdir(homeless) == "/"
    assert workdir(bob) == bob.home


# -- what arrives ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 100, 3_000_000])
def test_the_message_arrives_byte_for_byte_on_standard_input(unix_users, world_dir, size):
    alice = unix_users[ALICE]
    out = owned_dir(world_dir, alice)
    message = (MESSAGE + os.urandom(size))[:size]
    prog = script(world_dir, "store", f"cat > {out}/message\n")
    result, seconds = timed(command(prog, alice), message)
    assert result == Result(SENT, "2.0.0", f"delivered via {prog}")
    assert (out / "message").read_bytes() == message
    assert seconds < 8  # not held up to the 10 s time limit


def test_arguments_arrive_as_they_are_and_no_shell_ever_sees_them(unix_users, world_dir):
    alice = unix_users[ALICE]
    out = owned_dir(world_dir, alice)
    canary = Path(f"/tmp/qrtest-canary-{os.getpid()}")  # somewhere alice could write
    canary.unlink(missing_ok=True)
    arguments = [f";touch {canary}", f"$(touch {canary})", f"`touch {canary}`", f"| touch {canary} &&",
                 "two  spaces", "'single' \"double\"", "new\nline", "", "*", "-e", "back\\slash",
                 "$HOME", "ünïcödé ✉"]
    prog = script(world_dir, "argv", f"""printf '%s\\0' "$0" "$@" > {out}/argv\n""")
    result = run(command([prog, *arguments], alice), MESSAGE)
    assert result.status == SENT
    assert (out / "argv").read_bytes() == b"".join(arg.encode() + b"\0" for arg in [prog, *arguments])
    assert not canary.exists()


# -- how it ended ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, dsn, reply", [
    ("echo 'delivered to mailbox'", SENT, "2.0.0", "delivered to mailbox"),
    ("exit 0", SENT, "2.0.0", "delivered via PROG"),
    ("exit 75", DEFERRED, "4.3.0", "PROG exited with status 75 (EX_TEMPFAIL)"),
    ("echo 'over quota, later' >&2; exit 75", DEFERRED, "4.3.0", "over quota, later"),
    ("exit 67", BOUNCED, "5.1.1", "PROG exited with status 67 (EX_NOUSER)"),
    ("echo '5.1.1 no such user'; exit 1", BOUNCED, "5.1.1", "no such user"),
    ("printf '4.2.2 mailbox\\n   full\\n' >&2; exit 1", DEFERRED, "4.2.2", "mailbox full"),
    ("exit 1", BOUNCED, "5.3.0", "PROG exited with status 1"),
])
def test_the_exit_status_and_output_of_a_real_program_become_the_result(unix_users, world_dir,
                                                                       body, status, dsn, reply):
    prog = script(world_dir, "mda", body + "\n")
    assert run(command(prog, unix_users[ALICE]), MESSAGE) == Result(status, dsn, reply.replace("PROG", prog))


@pytest.mark.parametrize("code, status, dsn, reply", [
    (0, SENT, "2.0.0", "delivered via /usr/bin/maildrop"),
    (75, DEFERRED, "4.3.0", "/usr/bin/maildrop exited with status 75 (EX_TEMPFAIL)"),
    (71, DEFERRED, "4.3.0", "/usr/bin/maildrop exited with status 71 (EX_OSERR)"),
    (67, BOUNCED, "5.1.1", "/usr/bin/maildrop exited with status 67 (EX_NOUSER)"),
    (68, BOUNCED, "5.1.2", "/usr/bin/maildrop exited with status 68 (EX_NOHOST)"),
    (65, BOUNCED, "5.6.0", "/usr/bin/maildrop exited with status 65 (EX_DATAERR)"),
    (77, BOUNCED, "5.7.0", "/usr/bin/maildrop exited with status 77 (EX_NOPERM)"),
    (78, BOUNCED, "5.3.5", "/usr/bin/maildrop exited with status 78 (EX_CONFIG)"),
    (64, BOUNCED, "5.3.0", "/usr/bin/maildrop exited with status 64 (EX_USAGE)"),
    (1, BOUNCED, "5.3.0", "/usr/bin/maildrop exited with status 1"),
    (255, BOUNCED, "5.3.0", "/usr/bin/maildrop exited with status 255"),
])
def test_exit_statuses_are_mapped_as_pipe8_maps_sysexits(code, status, dsn, reply):
    assert verdict(code, b"", False, 10.0, "/usr/bin/maildrop") == Result(status, dsn, reply)


@pytest.mark.parametrize("code, output, expected", [
    (75, b"5.2.2 over quota\n", Result(BOUNCED, "5.2.2", "over quota")),  # the program's code wins
    (67, b"4.4.1\ttry later", Result(DEFERRED, "4.4.1", "try later")),
    (1, b"  \n5.1.1", Result(BOUNCED, "5.1.1", "/x exited with status 1")),
    (1, b"5.1.10 null MX", Result(BOUNCED, "5.1.10", "null MX")),
    (1, b"5.1.1x no", Result(BOUNCED, "5.3.0", "5.1.1x no")),  # not a code
    (1, b"2.0.0 fine", Result(BOUNCED, "5.3.0", "2.0.0 fine")),
    (1, b"5.1.1234 no", Result(BOUNCED, "5.3.0", "5.1.1234 no")),
    (1, b"no: 5.1.1 later", Result(BOUNCED, "5.3.0", "no: 5.1.1 later")),
    (0, b"5.1.1 said no but exited 0", Result(SENT, "2.0.0", "5.1.1 said no but exited 0")),
    (-11, b"oops", Result(DEFERRED, "4.3.0", "/x killed by signal SIGSEGV: oops")),
    (-9, b"", Result(DEFERRED, "4.3.0", "/x killed by signal SIGKILL")),
])
def test_an_enhanced_status_code_the_program_prints_first_wins(code, output, expected):
    assert verdict(code, output, False, 10.0, "/x") == expected


def test_a_time_out_is_a_bounce_that_says_so():
    assert verdict(-9, b"working...\n", True, 2.0, "/x") == Result(
        BOUNCED, "5.3.0", "command time limit of 2s exceeded: /x: working...")
    assert verdict(-9, b"", True, 0.5, "/x") == Result(BOUNCED, "5.3.0", "command time limit of 0.5s exceeded: /x")


def test_replies_are_one_short_clean_line():
    output = b"line one\r\n\n\tline\x00two \x1b[31mred\x07\x7f \xff\xfe end\xc2\x9b  \n"
    assert verdict(1, output, False, 1.0, "/x").reply == "line one linetwo [31mred \ufffd\ufffd end"
    long = verdict(0, b"word " * 1000, False, 1.0, "/x").reply
    assert len(long) == REPLY_CHARS - 1 and long == ("word " * 40).strip()
    assert len(verdict(1, b"x" * 5000, False, 1.0, "/x").reply) == REPLY_CHARS
    assert verdict(0, b"", False, 1.0, "/bin/evil\n5.0.0 forged").reply == "delivered via /bin/evil 5.0.0 forged"


# -- what it cannot do ----------------------------------------------------------------------------

def test_nothing_is_ever_run_as_root(world_dir):
    canary = world_dir / "ran"
    prog = script(world_dir, "touch", f"touch {canary}\n")
    root = Account("root", 0, 0, (0,), "/root", "/bin/sh")
    assert run(command(prog, root), MESSAGE) == Result(DEFERRED, "4.3.0", f"refusing to run {prog} as root")
    assert not canary.exists()


@pytest.mark.parametrize("problem, reason", [
    ("missing", "No such file or directory"),
    ("not executable", "Permission denied"),
    ("NUL in an argument", "embedded null byte"),
])
def test_a_program_that_cannot_be_started_is_a_temporary_failure_naming_it(unix_users, world_dir, problem, reason):
    prog = script(world_dir, "mda", "exit 0\n")
    argv = {"missing": [str(world_dir / "maildrop")], "not executable": [prog], "NUL in an argument": [prog, "a\0b"]}
    os.chmod(prog, 0o644 if problem == "not executable" else 0o755)
    result = run(command(argv[problem], unix_users[ALICE]), MESSAGE)
    assert result == Result(DEFERRED, "4.3.0", f"cannot run {argv[problem][0]}: {reason}")
    assert longest_run() == 0.0


def test_a_program_that_never_reads_its_input_is_delivered_without_a_hang(unix_users, world_dir):
    prog = script(world_dir, "mda", "echo 'thrown away'\n")
    result, seconds = timed(command(prog, unix_users[ALICE]), os.urandom(5_000_000))
    assert result == Result(SENT, "2.0.0", "thrown away")
    assert seconds < 8  # no hang until the 10 s time limit


def test_a_flood_of_output_is_read_to_its_end_without_growing_memory(unix_users, world_dir):
    prog = script(world_dir, "flood", """yes 'lots of output' | head -c 52428800
yes 'and lots of errors' | head -c 52428800 >&2
exit 75
""")
    me = psutil.Process()
    before = peak = me.memory_info().rss
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, me.memory_info().rss)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result, seconds = timed(command(prog, unix_users[ALICE], time_limit=20))
    finally:
        done.set()
        watcher.join()
    assert result.status == DEFERRED and result.dsn == "4.3.0"
    assert result.reply.startswith("lots of output lots of output") and len(result.reply) <= REPLY_CHARS
    assert peak - before < 20 * 1024 * 1024
    assert seconds < 10


def test_a_child_left_holding_the_output_does_not_hold_up_the_delivery(unix_users, world_dir):
    """Once the program has exited, its output is read for one more second and then let go, and
    the child is ended with the delivery."""
    alice = unix_users[ALICE]
    out = owned_dir(world_dir, alice)
    prog = script(world_dir, "mda", f"sleep 30 &\necho $! > {out}/child\necho delivered\n")
    result, seconds = timed(command(prog, alice))
    child = int((out / "child").read_text())
    assert result == Result(SENT, "2.0.0", "delivered")
    assert 0.9 < seconds < 10  # the one more second, and not the child's 30
    assert gone(child)


@pytest.mark.parametrize("ending", ["wait", "exec >&- 2>&- <&-; wait"])
def test_a_program_past_its_time_limit_is_killed_with_everything_it_started(unix_users, world_dir, ending):
    alice = unix_users[ALICE]
    out = owned_dir(world_dir, alice)
    prog = script(world_dir, "slow", f"""echo $$ > {out}/pids
sleep 30 & echo $! >> {out}/pids
sh -c 'sleep 30' & echo $! >> {out}/pids
echo working
{ending}
""")
    # 3 s: the program (sh as another user, and its children) must get to `echo working` under load
    result, seconds = timed(command(prog, alice, time_limit=3))
    assert result == Result(BOUNCED, "5.3.0", f"command time limit of 3s exceeded: {prog}: working")
    assert 3 <= seconds < 12  # the limit, and not the 30 s the program would take
    pids = [int(pid) for pid in (out / "pids").read_text().split()]
    assert len(pids) == 3
    assert wait_until(lambda: all(gone(pid) for pid in pids), 10)
    assert longest_run() == 0.0


def test_a_program_killed_by_a_signal_is_a_temporary_failure(unix_users, world_dir):
    prog = script(world_dir, "crash", "echo crashing\nkill -SEGV $$\n")
    assert run(command(prog, unix_users[ALICE]), MESSAGE) == Result(
        DEFERRED, "4.3.0", f"{prog} killed by signal SIGSEGV: crashing")


def test_longest_run_tells_how_long_the_oldest_run_has_been_going(unix_users, world_dir):
    prog = script(world_dir, "slow", "sleep 2\n")  # long enough to be seen running on a loaded machine
    assert longest_run() == 0.0
    results: list[Result] = []
    runner = threading.Thread(target=lambda: results.append(run(command(prog, unix_users[BOB]), MESSAGE)))
    runner.start()
    assert wait_until(lambda: longest_run() > 0.3, 10)
    runner.join()
    assert results == [Result(SENT, "2.0.0", f"delivered via {prog}")]
    assert longest_run() == 0.0


# -- a caller that is not root --------------------------------------------------------------------

CALLER = """
import json, sys, time
from dataclasses import astuple
from router.config import privileges
from workers.command import Account, Command, run
privileges.keep_only_switching()  # what the supervisor and a local worker do at start
privileges.for_local_worker()
for program, user, time_limit in json.loads(sys.argv[1]):
    start = time.monotonic()
    result = run(Command((program, user), Account.named(user), {}, time_limit), b"")
    print(json.dumps([*astuple(result), time.monotonic() - start]))
"""


def as_capable_caller(bob: Account, runs: list[tuple[str, str, float]]) -> list[tuple[Result, float]]:
    """Run `runs` (program, user, time limit) from a Python process that is bob with CAP_SETUID,
    CAP_SETGID and CAP_KILL as ambient capabilities, as systemd's AmbientCapabilities makes the
    daemon (packaging/systemd/qrouter.service), and a local worker's capabilities as the daemon
    sets them. Returns each result with its seconds."""
    caps = "+setuid,+setgid,+kill"
    caller = subprocess.run(
        ["setpriv", f"--reuid={bob.uid}", f"--regid={bob.gid}", "--init-groups", f"--inh-caps={caps}",
         f"--ambient-caps={caps}", sys.executable, "-c", CALLER, json.dumps(runs)],
        cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=20)
    assert caller.returncode == 0, caller.stderr
    return [(Result(*line[:3]), line[3]) for line in map(json.loads, caller.stdout.splitlines())]


def test_a_caller_with_capabilities_instead_of_root_hands_none_on(unix_users, world_dir):
    """The programs it runs, as another user or as itself, get no capability: with one, any
    user's mail filter could become root."""
    alice, bob = unix_users[ALICE], unix_users[BOB]
    outs = {account.name: owned_dir(world_dir, account) for account in (alice, bob)}
    prog = script(world_dir, "caps", f"""id -u > {world_dir}/out-$1/uid
grep ^Cap /proc/$$/status > {world_dir}/out-$1/caps
""")
    results = as_capable_caller(bob, [(prog, ALICE, 10.0), (prog, BOB, 10.0)])
    assert [result for result, _ in results] == [Result(SENT, "2.0.0", f"delivered via {prog}")] * 2
    for account in (alice, bob):
        out = outs[account.name]
        assert int((out / "uid").read_text()) == account.uid
        found = dict(line.split(":\t") for line in (out / "caps").read_text().splitlines())
        assert {name: int(found[name], 16) for name in ("CapPrm", "CapEff", "CapAmb")} == {
            "CapPrm": 0, "CapEff": 0, "CapAmb": 0}


def test_a_capable_caller_kills_another_users_program_at_the_time_limit(unix_users, world_dir):
    alice = unix_users[ALICE]
    out = owned_dir(world_dir, alice)
    prog = script(world_dir, "slow", f"""sleep 30 & echo $! > {out}/pids
echo $$ >> {out}/pids
echo working
wait
""")
    [(result, seconds)] = as_capable_caller(unix_users[BOB], [(prog, ALICE, 3.0)])  # 3 s: time to start it under load
    assert result == Result(BOUNCED, "5.3.0", f"command time limit of 3s exceeded: {prog}: working")
    assert 3 <= seconds < 12  # the limit, and not the 30 s the program would take
    pids = [int(pid) for pid in (out / "pids").read_text().split()]
    assert len(pids) == 2
    assert wait_until(lambda: all(gone(pid) for pid in pids), 10)
