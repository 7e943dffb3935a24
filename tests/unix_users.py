"""Real unix users for tests of programs run as someone else: `qrtest-alice` (also a member of
the group `qrtest-extra`) and `qrtest-bob`, each with a home directory and /bin/sh.

They are made with useradd the first time and kept: a developer's machine runs the tests again
and again. Making users needs root, and a test that cannot make them fails rather than being
skipped, since what it checks would then go unchecked.

Programs run as those users cannot reach pytest's tmp_path (its parents are 0700) nor this
machine's Python (under /root, 0700), so their test programs are /bin/sh scripts put in a
`world_dir`.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workers.command import Account

ALICE, BOB = "qrtest-alice", "qrtest-bob"
EXTRA_GROUP = "qrtest-extra"  # alice is a supplementary member


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _make(argv: list[str], done: Callable[[], bool]) -> None:
    """Run `argv` unless `done()`; another test run making the same thing at once is no failure."""
    if done():
        return
    made = subprocess.run(argv, capture_output=True, text=True)
    if made.returncode != 0 and not done():
        pytest.fail(f"{' '.join(argv)} failed: {made.stderr.strip()}")


@pytest.fixture(scope="session")
def unix_users() -> dict[str, Account]:
    """The test users by name, made if missing."""
    if os.geteuid() != 0:
        pytest.fail("these tests run programs as other unix users: they must run as root")
    _make(["groupadd", EXTRA_GROUP], lambda: _exists(grp.getgrnam, EXTRA_GROUP))
    for name in (ALICE, BOB):
        _make(["useradd", "--create-home", "--shell", "/bin/sh", name], lambda name=name: _exists(pwd.getpwnam, name))
    _make(["usermod", "-aG", EXTRA_GROUP, ALICE], lambda: ALICE in grp.getgrnam(EXTRA_GROUP).gr_mem)
    return {name: Account.named(name) for name in (ALICE, BOB)}


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A fresh directory under /tmp, mode 0755, that every user may enter and read: put programs
    for other users here. Removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="qrtest-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def script(directory: Path, name: str, body: str) -> str:
    """A /bin/sh script anyone may run, in `directory`; returns its path."""
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}")
    path.chmod(0o755)
    return str(path)


def owned_dir(directory: Path, account: Account) -> Path:
    """A directory in `directory` where a program run as `account` may write (and nobody else)."""
    path = directory / f"out-{account.name}"
    path.mkdir(mode=0o700, exist_ok=True)
    os.chown(path, account.uid, account.gid)
    return path
