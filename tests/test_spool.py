"""The spool's directories and their permissions."""

from __future__ import annotations

import grp
import os
import stat

from router.spool import QUEUES, Spool


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_queue_directories_are_private(tmp_path):
    Spool(tmp_path / "spool").create()
    for queue in QUEUES:
        assert mode(tmp_path / "spool" / queue) == 0o700, queue


def test_spool_group_may_write(tmp_path):
    group = grp.getgrnam("mail")
    spool = Spool(tmp_path / "spool", group="mail")
    spool.create()
    for queue in QUEUES:
        info = os.stat(tmp_path / "spool" / queue)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o2770, group.gr_gid), queue
    queue_id = spool.enqueue("a@example.org", ["b@example.org"], b"x\n")
    info = os.stat(tmp_path / "spool" / "incoming" / queue_id)
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, group.gr_gid)
