"""Local submissions (`qrouter enqueue`, `qrouter-sendmail`) as Postfix's pickup and cleanup
treat them: a Received: field first, the missing From:, Date: and Message-ID: added by sendmail,
and a spool made when the daemon never ran. The real commands as subprocesses; the queued file
read with router.spool.queue_file.parse and its message with Python's email package."""

from __future__ import annotations

import email
import email.policy
import email.utils
import grp
import os
import pwd
import re
from pathlib import Path

import pytest

from router.spool.queue_file import QueueFile, parse
from router.spool.queue_id import arrival_of
from tests.daemon import qrouter
from tests.test_sendmail import ENTRIES, sendmail

ME = "submit.qrouter.test"
RECEIVED = re.compile(rf"by {re.escape(ME)} \(qrouter, from userid (\d+)\) id (\S+) for <r@example\.net>; (.+)")


def write_config(directory: Path, *lines: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "qrouter.conf"
    path.write_text("".join(f"{line}\n" for line in ("queue-dir spool", f"me {ME}", *lines)))
    return path


@pytest.fixture
def config(tmp_path) -> Path:
    return write_config(tmp_path)


def enqueue(config: Path, message: bytes) -> str:
    result = qrouter("enqueue", "--config", str(config), "-f", "s@example.org", "r@example.net", stdin=message)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


def submit(config: Path, *args: str, message: bytes, entry: str = "qrouter-sendmail") -> str:
    result = sendmail("--config", str(config), "-v", *args, "r@example.net", stdin=message, entry=entry)
    assert result.returncode == 0, result.stderr
    return re.search(r"queued as (\S+)", result.stderr.decode()).group(1)


def queued(config: Path, queue_id: str) -> QueueFile:
    path = config.parent / "spool" / "incoming" / queue_id
    return parse(path.read_bytes(), str(path))


def added_and_parsed(stored: QueueFile, original: bytes) -> tuple[list[bytes], email.message.EmailMessage]:
    """The lines put before the original message (which must follow byte for byte), and the
    whole message as the email package reads it."""
    assert stored.message.endswith(original), "the message did not follow byte for byte"
    added = stored.message[: len(stored.message) - len(original)]
    return added.splitlines(keepends=True), email.message_from_bytes(stored.message, policy=email.policy.default)


def check_received(parsed: email.message.EmailMessage, queue_id: str) -> None:
    """Received: is the first field and names this host, our uid, the queue id, the one recipient
    and its arrival."""
    assert parsed.keys()[0] == "Received"
    [field] = parsed.get_all("Received")
    uid, named_id, date = RECEIVED.fullmatch(" ".join(str(field).split())).groups()
    assert (int(uid), named_id) == (os.getuid(), queue_id)
    assert email.utils.parsedate_to_datetime(date).timestamp() == int(arrival_of(queue_id))


# -- the spool before the daemon's first start -------------------------------------------------

def spool_modes(spool: Path) -> dict[str, tuple[int, int]]:
    return {str(d.relative_to(spool.parent)): (d.stat().st_mode & 0o7777, d.stat().st_gid)
            for d in [spool, *spool.iterdir()] if d.is_dir()}


@pytest.mark.parametrize("group", ["", "nogroup"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_sendmail_before_the_first_start_makes_the_spool_as_enqueue_does(tmp_path, group, entry):
    settings = [f"spool-group {group}"] if group else []
    by_sendmail = write_config(tmp_path / "sendmail", *settings)
    by_enqueue = write_config(tmp_path / "enqueue", *settings)
    queue_id = submit(by_sendmail, message=b"Subject: before the daemon\n\nx\n", entry=entry)
    enqueue(by_enqueue, b"Subject: before the daemon\n\nx\n")
    spool = by_sendmail.parent / "spool"
    assert os.listdir(spool / "incoming") == [queue_id]
    assert queued(by_sendmail, queue_id).message.endswith(b"\n\nx\n")
    modes = spool_modes(spool)
    assert modes == spool_modes(by_enqueue.parent / "spool")
    expected = (0o2770, grp.getgrnam(group).gr_gid) if group else (0o700, os.getgid())
    assert set(modes.values()) == {expected} and len(modes) == 8


# -- Received: --------------------------------------------------------------------------------

@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("command", ["enqueue", "sendmail"])
def test_received_comes_first_in_the_message_s_own_line_ending(config, command, newline):
    original = newline.join([b"From: a@example.org", b"Date: Mon, 1 Jan 2024 00:00:00 +0000",
                             b"Message-ID: <1@example.org>", b"Subject: trace", b"", b"body", b""])
    queue_id = enqueue(config, original) if command == "enqueue" else submit(config, message=original)
    added, parsed = added_and_parsed(queued(config, queue_id), original)
    assert len(added) == 2 and added[0].startswith(b"Received: ") and added[1].startswith(b"\tid ")
    assert all(line.endswith(newline) and not line[:-len(newline)].endswith(b"\r") for line in added)
    check_received(parsed, queue_id)
    for name in ("From", "Date", "Message-ID"):  # present already: sendmail adds none again
        assert len(parsed.get_all(name)) == 1


def test_enqueue_adds_only_received(config):
    original = b"Subject: nothing else\n\nbody\n"
    queue_id = enqueue(config, original)
    added, parsed = added_and_parsed(queued(config, queue_id), original)
    assert len(added) == 2
    assert [parsed.get(name) for name in ("From", "Date", "Message-ID")] == [None, None, None]


# -- From:, Date:, Message-ID: ----------------------------------------------------------------

@pytest.mark.parametrize("args, author", [
    (["-f", "cron@example.org", "-F", "Cron Daemon"], ("Cron Daemon", "cron@example.org")),
    (["-f", "cron@example.org"], ("", "cron@example.org")),
    (["-F", "Jörg Müller, Ops"], ("Jörg Müller, Ops", None)),  # None: the invoking user at me
    (["-f", "<>"], ("", None)),
])
def test_sendmail_adds_from_date_and_message_id_when_missing(config, args, author):
    original = b"Subject: from cron\n\nline one\n\n.. two dots\n"
    queue_id = submit(config, *args, message=original)
    added, parsed = added_and_parsed(queued(config, queue_id), original)
    assert len(added) == 5  # Received: (two lines), From:, Date:, Message-ID:
    check_received(parsed, queue_id)
    name, address = author
    [sender] = parsed["From"].addresses
    user = pwd.getpwuid(os.getuid()).pw_name
    assert (sender.display_name, sender.addr_spec) == (name, address or f"{user}@{ME}")
    assert email.utils.parsedate_to_datetime(parsed["Date"]).timestamp() == int(arrival_of(queue_id))
    assert parsed["Message-ID"] == f"<{queue_id}@{ME}>"
    assert [len(parsed.get_all(n)) for n in ("From", "Date", "Message-ID", "Subject")] == [1, 1, 1, 1]
    assert parsed.get_content() == "line one\n\n.. two dots\n"


def test_sendmail_adds_only_what_is_missing(config):
    original = b"date: Mon, 1 Jan 2024 00:00:00 +0000\nSubject: has a date\n\nbody\n"
    queue_id = submit(config, "-f", "s@example.org", message=original)
    added, parsed = added_and_parsed(queued(config, queue_id), original)
    assert [line.split(b":")[0] for line in added[2:]] == [b"From", b"Message-ID"]
    assert parsed.get_all("Date") == ["Mon, 01 Jan 2024 00:00:00 +0000"]


def test_a_message_without_a_header_keeps_its_first_line_in_the_body(config):
    original = b"just text: no header\r\nsecond line\r\n"
    queue_id = submit(config, "-f", "s@example.org", message=original)
    added, parsed = added_and_parsed(queued(config, queue_id), original)
    assert added[-1] == b"\r\n"  # the empty line that ends the added header
    assert parsed.get("just text") is None
    assert parsed.get_content() == original.decode()
