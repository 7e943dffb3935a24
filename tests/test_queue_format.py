"""The queue file format (docs/queue-format.md): the reader, the writer, the documentation's
examples, and a Perl writer built from the documentation queueing into the running daemon."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.spool import Spool
from router.spool import queue_file as qf
from router.spool.queue_file import (
    DELIVERED,
    FAILED,
    PENDING,
    CorruptQueueFile,
    QueueFile,
    Recipient,
    journal_record,
    parse,
)
from router.spool.queue_id import arrival_of, is_queue_id, new_queue_id
from tests.daemon import ROOT, message_in, wait_for

DOC = ROOT / "docs" / "queue-format.md"
PERL_WRITER = ROOT / "docs" / "examples" / "write-queue-file.pl"
PERL = "/usr/bin/perl"
WHERE = "/var/spool/qrouter/active/60A2418202240-1A2B-1"


def full_queue_file() -> QueueFile:
    """A queue file with every field in use and a message that looks like header and journal."""
    message = (b"Subject: tricky\r\n\r\nsize 3\n\n@0 state delivered\nqrouter-queue-file 1\n"
               + bytes(range(256)) + b"\n\nno final newline")
    queue_file = QueueFile(
        queue_id="60A2418202240-1A2B-1",
        arrival=1700000000.123456,
        sender="alice@example.com",
        recipients=[
            Recipient("bob@example.org", state=DELIVERED, notify="SUCCESS,FAILURE",
                      orcpt="rfc822;bob@example.org", dsn="2.0.0", relay="mx.example.org[192.0.2.1]:25",
                      reply="250 2.0.0 Ok: queued as ABC"),
            Recipient("jörg@bücher.example", state=FAILED, dsn="5.1.1", relay="none",
                      reply="550 5.1.1 <jörg@bücher.example>: no such user"),
            Recipient('"john smith"@[192.0.2.7]', dsn="4.4.1", reply="connection refused"),
        ],
        message=message,
        attempts=3,
        envid="QQ314159",
        ret="HDRS",
    )
    queue_file.add_log(1700000001.5, "attempt 1: 1 sent, 2 deferred, 0 bounced")
    queue_file.add_log(1700000100.25, "attempt 2: 0 sent, 1 deferred, 1 bounced")
    return queue_file


def header(*lines: str, message: bytes = b"hello", size: int | None = None) -> bytes:
    """A queue file from header lines; `size` defaults to the message's length."""
    text = "\n".join([*lines, f"size {len(message) if size is None else size}"]) + "\n\n"
    return text.encode() + message


BASE = [
    "qrouter-queue-file 1",             # line 1
    "id 60A2418202240-1A2B-1",          # line 2
    "arrival 1700000000.123456",        # line 3
    "attempts 0",                       # line 4
    "sender <a@example.org>",           # line 5
    "rcpt <b@example.org>",             # line 6
]                                       # line 7: size


def with_line(number: int, text: str | None, base: list[str] = BASE) -> list[str]:
    """BASE with line `number` replaced by `text` (None: removed)."""
    lines = list(base)
    if text is None:
        del lines[number - 1]
    else:
        lines[number - 1] = text
    return lines


def corrupt_message(data: bytes) -> str:
    with pytest.raises(CorruptQueueFile) as info:
        parse(data, WHERE)
    return str(info.value)


# -- round trip ---------------------------------------------------------------------------


def test_round_trip_keeps_every_field():
    original = full_queue_file()
    data = original.to_bytes()
    parsed = parse(data, WHERE)
    assert parsed == original
    assert parsed.journal_bytes == 0
    assert parsed.to_bytes() == data
    assert [r.state for r in parsed.recipients] == [DELIVERED, FAILED, PENDING]
    assert parsed.pending() == [parsed.recipients[2]]


def test_written_header_follows_the_documented_order():
    lines = full_queue_file().to_bytes().split(b"\n\n", 1)[0].decode().split("\n")
    keys = [line.split(" ", 1)[0] for line in lines]
    assert keys == ["qrouter-queue-file", "id", "arrival", "attempts", "sender", "envid", "ret", "log", "log",
                    "rcpt", "notify", "orcpt", "dsn", "relay", "reply", "state",
                    "rcpt", "dsn", "relay", "reply", "state",
                    "rcpt", "dsn", "reply", "size"]


def test_null_sender_is_written_as_empty_angle_brackets():
    queue_file = QueueFile("60A2418202240-1A2B-1", 1700000000.123456, "", [Recipient("b@example.org")], b"x")
    data = queue_file.to_bytes()
    assert b"\nsender <>\n" in data
    assert parse(data).sender == ""


def test_text_from_outside_cannot_add_header_lines():
    """A DSN envelope id or a remote reply holding a line break must not smuggle in a recipient."""
    queue_file = full_queue_file()
    queue_file.envid = "x\nrcpt <mallory@example.net>"
    queue_file.ret = "FULL\r\nstate delivered"
    queue_file.recipients[2].reply = "421 bye\r\nrcpt <mallory@example.net>\n\n"
    parsed = parse(queue_file.to_bytes(), WHERE)
    assert [r.address for r in parsed.recipients] == [r.address for r in queue_file.recipients]
    assert parsed.envid == "x?rcpt <mallory@example.net>"
    assert parsed.ret == "FULL??state delivered"
    assert parsed.recipients[2].reply == "421 bye??rcpt <mallory@example.net>??"
    assert parsed.message == queue_file.message


def test_source_route_is_dropped_when_read():
    data = header(*with_line(6, "rcpt <@relay.example,@other.example:b@example.org>"))
    assert parse(data).recipients[0].address == "b@example.org"


# -- the journal --------------------------------------------------------------------------


def delivered_carol() -> Recipient:
    return Recipient("carol@example.net", state=DELIVERED, dsn="2.0.0", relay="mx.example.net[198.51.100.7]:25",
                     reply="250 2.0.0 Ok")


def test_journal_group_sets_the_recipient_result():
    data = full_queue_file().to_bytes()
    record = journal_record(2, delivered_carol())
    assert record == (b"@2 dsn 2.0.0\n@2 relay mx.example.net[198.51.100.7]:25\n@2 reply 250 2.0.0 Ok\n"
                      b"@2 state delivered\n")
    parsed = parse(data + record, WHERE)
    rcpt = parsed.recipients[2]
    assert (rcpt.state, rcpt.dsn, rcpt.relay, rcpt.reply) == (
        DELIVERED, "2.0.0", "mx.example.net[198.51.100.7]:25", "250 2.0.0 Ok")
    assert parsed.pending() == []
    assert parsed.journal_bytes == len(record)
    assert parsed.message == full_queue_file().message


def test_journal_group_without_its_state_line_changes_nothing():
    data = full_queue_file().to_bytes()
    record = journal_record(2, delivered_carol())
    without_state = record[:record.index(b"@2 state")]
    parsed = parse(data + without_state, WHERE)
    assert parsed.recipients == full_queue_file().recipients
    assert parsed.recipients[2].dsn == "4.4.1"
    assert parsed.pending() == [parsed.recipients[2]]


def test_torn_journal_append_is_ignored_at_every_cut():
    data = full_queue_file().to_bytes()
    first = journal_record(0, Recipient("bob@example.org", state=DELIVERED, dsn="2.0.0", relay="r", reply="ok"))
    second = journal_record(2, delivered_carol())
    for cut in range(len(second) + 1):
        parsed = parse(data + first + second[:cut], WHERE)
        carol = parsed.recipients[2]
        if cut == len(second):
            assert carol.state == DELIVERED and carol.reply == "250 2.0.0 Ok"
        else:
            assert carol == full_queue_file().recipients[2], f"cut at {cut} changed the recipient"
        assert parsed.recipients[0].reply == "ok"


def test_later_journal_group_wins():
    data = full_queue_file().to_bytes()
    deferred = Recipient("carol@example.net", dsn="4.2.0", relay="r1", reply="busy")
    parsed = parse(data + journal_record(2, deferred) + journal_record(2, delivered_carol()))
    assert parsed.recipients[2].state == DELIVERED
    assert parsed.recipients[2].relay == "mx.example.net[198.51.100.7]:25"
    parsed = parse(data + journal_record(2, delivered_carol()) + journal_record(2, deferred))
    assert parsed.recipients[2].state == PENDING
    assert parsed.recipients[2].reply == "busy"


@pytest.mark.parametrize(("journal", "expected"), [
    (b"garbage\n", "bad journal line b'garbage'"),
    (b"\n", "bad journal line b''"),
    (b"@3 state delivered\n", "bad journal line b'@3 state delivered'"),
    (b"@0 colour red\n@0 state delivered\n", "bad journal line b'@0 colour red'"),
    (b"@x state delivered\n", "bad journal line b'@x state delivered'"),
    (b"@-1 state delivered\n", "bad journal line"),
    (b"@0state delivered\n", "bad journal line"),
    (b"@0 state lost\n", "journal: unknown recipient state 'lost'"),
    (b"@" + b"1" * 5000 + b" state delivered\n", "bad journal line b'@111"),
    (b"@* crashed\n", "bad journal line b'@* crashed'"),
    (b"@* crash 2\n", "bad journal line b'@* crash 2'"),
    (b"@*crash\n", "bad journal line b'@*crash'"),
    (b"@* state delivered\n", "bad journal line b'@* state delivered'"),
    (b"@0 sta@* crash\n", "bad journal line b'@0 sta@* crash'"),
], ids=["garbage", "empty-line", "no-such-recipient", "unknown-key", "bad-index", "negative-index",
        "no-space", "unknown-state", "huge-index", "unknown-envelope-record", "envelope-record-value",
        "envelope-record-no-space", "envelope-state", "record-glued-to-a-torn-line"])
def test_bad_journal_line_is_an_error(journal, expected):
    message = corrupt_message(full_queue_file().to_bytes() + journal)
    assert message.startswith(f"{WHERE}: ")
    assert expected in message


# -- the count of workers a message killed (version 2) ------------------------------------


def test_crashes_survive_the_round_trip_in_a_version_2_header():
    original = full_queue_file()
    original.crashes = 2
    data = original.to_bytes()
    assert data.startswith(b"qrouter-queue-file 2\n")
    assert b"\nattempts 3\ncrashes 2\nsender <alice@example.com>\n" in data
    parsed = parse(data, WHERE)
    assert parsed.crashes == 2
    assert parsed == original
    assert parsed.to_bytes() == data


def test_a_file_without_crashes_is_still_written_as_version_1():
    data = full_queue_file().to_bytes()
    assert data.startswith(b"qrouter-queue-file 1\n")
    assert b"\ncrashes " not in data.split(b"\n\n", 1)[0]
    assert parse(data, WHERE).crashes == 0


def test_version_1_file_is_still_read():
    parsed = parse(header(*BASE), WHERE)
    assert (parsed.queue_id, parsed.sender, parsed.crashes) == ("60A2418202240-1A2B-1", "a@example.org", 0)
    assert [r.address for r in parsed.recipients] == ["b@example.org"]
    assert parsed.to_bytes() == header(*BASE)


def test_version_2_header_without_crashes_is_read():
    assert parse(header(*with_line(1, "qrouter-queue-file 2")), WHERE).crashes == 0


def test_crash_records_add_to_the_header_count():
    original = full_queue_file()
    original.crashes = 1
    data = original.to_bytes()
    carol = journal_record(2, delivered_carol())
    parsed = parse(data + b"@* crash\n" + carol + b"@* crash\n", WHERE)
    assert parsed.crashes == 3
    assert parsed.recipients[2].state == DELIVERED
    assert parsed.journal_bytes == len(carol) + 2 * len(b"@* crash\n")
    rewritten = parsed.to_bytes()
    assert b"\ncrashes 3\n" in rewritten and parse(rewritten, WHERE).crashes == 3


def test_crash_records_follow_a_version_1_header():
    """The daemon appends them to whatever file a dead worker held, a front door's included."""
    parsed = parse(header(*BASE) + b"@* crash\n@* crash\n", WHERE)
    assert parsed.crashes == 2
    assert parsed.to_bytes().startswith(b"qrouter-queue-file 2\n")


def test_crash_record_inside_an_unfinished_group_leaves_the_group_unfinished():
    data = header(*BASE) + b"@0 dsn 2.0.0\n@* crash\n"
    parsed = parse(data, WHERE)
    assert parsed.crashes == 1
    assert (parsed.recipients[0].state, parsed.recipients[0].dsn) == (PENDING, "")


def test_held_record_starts_the_count_again():
    original = full_queue_file()
    original.crashes = 2
    data = original.to_bytes()
    assert parse(data + b"@* crash\n@* held\n", WHERE).crashes == 0
    assert parse(data + b"@* crash\n@* held\n@* crash\n", WHERE).crashes == 1


def test_torn_crash_record_is_ignored():
    data = header(*BASE) + b"@* crash\n"
    for cut in range(len(b"@* crash\n")):
        assert parse(data[:len(data) - len(b"@* crash\n") + cut], WHERE).crashes == 0


# -- Spool.record_crash: the supervisor's append to a file a dead worker left -----------------


def active_file(tmp_path: Path, queue_file: QueueFile, tail: bytes = b"") -> tuple[Spool, str]:
    spool = Spool(tmp_path / "spool")
    spool.create()
    path = spool.path("active", queue_file.queue_id)
    Path(path).write_bytes(queue_file.to_bytes() + tail)
    return spool, path


def test_record_crash_after_a_torn_journal_line_keeps_the_file_readable(tmp_path):
    queue_file = full_queue_file()
    first = journal_record(0, Recipient("bob@example.org", state=DELIVERED, dsn="2.0.0", relay="r", reply="ok"))
    second = journal_record(2, delivered_carol())
    for cut in range(len(second)):
        spool, path = active_file(tmp_path, queue_file, first + second[:cut])
        spool.record_crash(queue_file.queue_id)
        data = Path(path).read_bytes()
        whole_lines = second[:cut][:second[:cut].rfind(b"\n") + 1]
        assert data == queue_file.to_bytes() + first + whole_lines + b"@* crash\n", f"cut at {cut}"
        parsed = parse(data, path)
        assert parsed.crashes == 1
        assert parsed.recipients[0].reply == "ok"
        assert parsed.recipients[2] == queue_file.recipients[2]


def test_record_crash_onto_a_torn_line_that_gluing_would_make_corrupt(tmp_path):
    queue_file = parse(header(*BASE, message=b"hello\n"))
    spool, path = active_file(tmp_path, queue_file, b"@0 sta")
    with pytest.raises(CorruptQueueFile):
        parse(Path(path).read_bytes() + b"@* crash\n", path)  # what a plain append would leave
    spool.record_crash(queue_file.queue_id)
    spool.record_crash(queue_file.queue_id)
    assert Path(path).read_bytes() == header(*BASE, message=b"hello\n") + b"@* crash\n@* crash\n"
    assert parse(Path(path).read_bytes(), path).crashes == 2


@pytest.mark.parametrize("message", [b"no final newline", b"", b"ends in a torn-looking line\n@0 sta"])
def test_record_crash_never_cuts_the_message(tmp_path, message):
    queue_file = parse(header(*BASE, message=message))
    spool, path = active_file(tmp_path, queue_file)
    spool.record_crash(queue_file.queue_id)
    parsed = parse(Path(path).read_bytes(), path)
    assert (parsed.message, parsed.crashes) == (message, 1)
    spool, path = active_file(tmp_path, queue_file, b"@0 dsn 2.0.0\n@0 sta")
    spool.record_crash(queue_file.queue_id)
    parsed = parse(Path(path).read_bytes(), path)
    assert (parsed.message, parsed.crashes) == (message, 1)
    assert Path(path).read_bytes().endswith(message + b"@0 dsn 2.0.0\n@* crash\n")


def test_record_crash_on_a_version_1_file_from_a_front_door(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    queue_id = spool.enqueue("a@example.org", ["b@example.org"], b"no final newline")
    os.rename(spool.path("incoming", queue_id), spool.path("active", queue_id))
    spool.record_crash(queue_id)
    data = Path(spool.path("active", queue_id)).read_bytes()
    assert data.startswith(b"qrouter-queue-file 1\n") and data.endswith(b"no final newline@* crash\n")
    assert parse(data).crashes == 1


def test_record_crash_leaves_what_is_not_a_queue_file_alone(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not yours")
    os.symlink(target, spool.path("active", "60A2418202240-1A2B-1"))
    os.mkfifo(spool.path("active", "60A2418202240-1A2B-2"))
    os.mkdir(spool.path("active", "60A2418202240-1A2B-3"))
    Path(spool.path("active", "60A2418202240-1A2B-4")).write_bytes(b"no header at all")
    for number in range(1, 6):  # 5 does not exist
        spool.record_crash(f"60A2418202240-1A2B-{number}")
    assert target.read_bytes() == b"not yours"
    assert Path(spool.path("active", "60A2418202240-1A2B-4")).read_bytes() == b"no header at all"


# -- corrupt files: every error names the file and, for a header line, its number -------------


HEADER_ERRORS = [
    (with_line(1, "hello 1"), f"{WHERE}:1: not a queue file (expected 'qrouter-queue-file 1')"),
    (with_line(1, "qrouter-queue-file"), f"{WHERE}:1: unsupported queue file version ''"),
    (with_line(1, "qrouter-queue-file 4"), f"{WHERE}:1: unsupported queue file version '4'"),
    (with_line(1, "qrouter-queue-file 0"), f"{WHERE}:1: unsupported queue file version '0'"),
    (with_line(1, "qrouter-queue-file 1.0"), f"{WHERE}:1: unsupported queue file version '1.0'"),
    (with_line(2, "id ../../etc/passwd"), f"{WHERE}:2: '../../etc/passwd' is not a queue id"),
    (with_line(2, "id 60a2418202240-1a2b-1"), f"{WHERE}:2: '60a2418202240-1a2b-1' is not a queue id"),
    (with_line(3, "arrival nan"), f"{WHERE}:3: arrival: 'nan' is not a number"),
    (with_line(3, "arrival 1e9"), f"{WHERE}:3: arrival: '1e9' is not a number"),
    (with_line(3, "arrival "), f"{WHERE}:3: arrival: '' is not a number"),
    (with_line(4, "attempts -1"), f"{WHERE}:4: attempts: '-1' is not a number"),
    (with_line(4, "attempts " + "9" * 5000), f"{WHERE}:4: attempts: '{'9' * 5000}' is not a number"),
    (with_line(4, "crashes 1"), f"{WHERE}:4: 'crashes' needs version 2 of the format, the file says 1"),
    (with_line(4, "colour blue"), f"{WHERE}:4: unknown key 'colour'"),
    (with_line(4, "Attempts 0"), f"{WHERE}:4: unknown key 'Attempts'"),
    (with_line(4, " 0"), f"{WHERE}:4: unknown key ''"),
    (with_line(4, "dsn 2.0.0"), f"{WHERE}:4: 'dsn' before any 'rcpt' line"),
    (with_line(4, "sender <c@example.org>"), f"{WHERE}:5: 'sender' given twice"),
    (with_line(5, "sender a@example.org"), f"{WHERE}:5: sender: address 'a@example.org' is not in angle brackets"),
    (with_line(5, "sender <a b@example.org>"),
     f"{WHERE}:5: sender: local part of 'a b@example.org' is not a valid dot-string or quoted string"),
    (with_line(5, "sender <a@example.org>\r"),
     f"{WHERE}:5: sender: address '<a@example.org>\\r' is not in angle brackets"),
    (with_line(6, "rcpt <b@example..org>"), f"{WHERE}:6: domain of 'b@example..org' is not a valid host name"),
    (with_line(6, "rcpt <b>"), f"{WHERE}:6: address 'b' has no local part and domain (user@domain)"),
    (with_line(6, "rcpt <>"), f"{WHERE}:6: the null address <> is only valid as a sender"),
    (with_line(6, "rcpt <b@[IPv6:fe80::1%eth0]>"),
     f"{WHERE}:6: domain of 'b@[IPv6:fe80::1%eth0]' is not a valid address literal"),
    ([*BASE, "state lost"], f"{WHERE}:7: unknown recipient state 'lost'"),
    ([*BASE, "state Delivered"], f"{WHERE}:7: unknown recipient state 'Delivered'"),
    ([*BASE, "rcpt <c@example.org>", "colour blue"], f"{WHERE}:8: unknown key 'colour'"),
]


@pytest.mark.parametrize(("lines", "expected"), HEADER_ERRORS, ids=[e[1][len(WHERE):][:50] for e in HEADER_ERRORS])
def test_header_error_names_file_and_line(lines, expected):
    assert corrupt_message(header(*lines)) == expected


def test_bad_size_names_its_line():
    assert corrupt_message(header(*BASE, size=-5)) == f"{WHERE}:7: size: '-5' is not a number"
    data = header(*BASE).replace(b"size 5", b"size 0x5")
    assert corrupt_message(data) == f"{WHERE}:7: size: '0x5' is not a number"


@pytest.mark.parametrize("key", ["id", "arrival", "sender", "size"])
def test_missing_required_line(key):
    lines = [line for line in BASE if not line.startswith(key + " ")]
    data = "\n".join(lines).encode() + b"\n\nhello" if key == "size" else header(*lines)
    assert corrupt_message(data) == f"{WHERE}: required line '{key}' is missing"


def test_optional_lines_may_be_left_out():
    parsed = parse(header(*with_line(4, None)), WHERE)
    assert parsed.attempts == 0 and parsed.envid == parsed.ret == "" and parsed.log == []


def test_no_recipient():
    assert corrupt_message(header(*BASE[:5])) == f"{WHERE}: no 'rcpt' line"


def test_no_end_of_header():
    message = corrupt_message(b"qrouter-queue-file 1\nid 60A2418202240-1A2B-1\n")
    assert message == f"{WHERE}: no end of header (empty line) in the first 1048576 bytes"


def test_header_with_crlf_line_ends_is_rejected():
    assert corrupt_message(header(*BASE).replace(b"\n", b"\r\n")).startswith(f"{WHERE}: no end of header")


def test_header_end_beyond_the_limit_is_rejected():
    data = header(*BASE, *["log " + "x" * 1000] * 1100)
    assert corrupt_message(data).startswith(f"{WHERE}: no end of header")


def test_header_that_is_not_utf8():
    data = header(*with_line(6, "rcpt <jörg@example.org>")).replace("ö".encode(), b"\xf6")
    offset = data.index(b"\xf6")
    assert corrupt_message(data) == f"{WHERE}: header is not UTF-8 (invalid start byte at byte {offset})"


def test_truncated_file_is_detected_at_every_length():
    data = full_queue_file().to_bytes()
    body_start = data.index(b"\n\n") + 2
    size = len(full_queue_file().message)
    for length in range(body_start, len(data)):
        message = corrupt_message(data[:length])
        assert message == f"{WHERE}: truncated: size says {size} bytes, the file holds {length - body_start}"


def test_size_smaller_than_message_leaves_bytes_that_are_no_journal():
    data = header(*BASE, message=b"hello world\n", size=5)
    assert corrupt_message(data) == f"{WHERE}: bad journal line b' world'"


def test_default_where_is_queue_file():
    with pytest.raises(CorruptQueueFile, match=r"^queue file:1: not a queue file"):
        parse(b"hello\n\n")


# -- properties ---------------------------------------------------------------------------

ADDRESSES = ["a@example.org", "jörg@bücher.example", '"x y"@example.net', "postmaster@[192.0.2.1]",
             "root@[IPv6:::1]", "用户@例子.广告"]
text_values = st.text(max_size=40)
recipients = st.builds(
    Recipient, st.sampled_from(ADDRESSES), st.sampled_from([PENDING, DELIVERED, FAILED]),
    text_values, text_values, text_values, text_values, text_values)


@st.composite
def queue_files(draw) -> QueueFile:
    usec = draw(st.integers(0, 16 ** 13 - 1))
    queue_id = f"{usec:013X}-{draw(st.integers(1, 2 ** 22)):X}-{draw(st.integers(1, 10 ** 6)):X}"
    queue_file = QueueFile(queue_id, arrival_of(queue_id), draw(st.sampled_from(["", *ADDRESSES])),
                           draw(st.lists(recipients, min_size=1, max_size=4)), draw(st.binary(max_size=300)),
                           attempts=draw(st.integers(0, 10 ** 6)), envid=draw(text_values), ret=draw(text_values),
                           crashes=draw(st.sampled_from([0, 0, 1, 3, 10 ** 6])))
    for entry in draw(st.lists(text_values, max_size=3)):
        queue_file.add_log(draw(st.floats(0, 4e9)), entry)
    return queue_file


def cleaned(queue_file: QueueFile) -> QueueFile:
    """What a reader gets back: control characters in text values written as '?'."""
    for rcpt in queue_file.recipients:
        for key in ("notify", "orcpt", "dsn", "relay", "reply"):
            setattr(rcpt, key, qf.clean(getattr(rcpt, key)))
    queue_file.envid, queue_file.ret = qf.clean(queue_file.envid), qf.clean(queue_file.ret)
    return queue_file


PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(queue_files())
def test_any_queue_file_survives_the_round_trip(queue_file):
    assert parse(queue_file.to_bytes(), WHERE) == cleaned(queue_file)


@PROPERTY
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise_anything_but_corrupt_queue_file(data):
    try:
        parse(data, WHERE)
    except CorruptQueueFile as exc:
        assert str(exc).startswith(WHERE + ":")


@PROPERTY
@given(st.lists(st.sampled_from([*BASE, "size 5", "size 3", "rcpt <>", "state delivered", "dsn 2.0.0",
                                 "log x", "attempts -1", "", "\udcff"]), max_size=12),
       st.binary(max_size=20))
def test_shuffled_header_lines_never_raise_anything_but_corrupt_queue_file(lines, tail):
    data = "\n".join(lines).encode(errors="surrogateescape") + b"\n\n" + tail
    try:
        parse(data, WHERE)
    except CorruptQueueFile as exc:
        assert str(exc).startswith(WHERE + ":")


@st.composite
def mutated_files(draw) -> tuple[QueueFile, bytes, bytes]:
    queue_file = draw(queue_files())
    data = queue_file.to_bytes()
    if draw(st.booleans()):
        data += b"".join(journal_record(i, r) for i, r in enumerate(queue_file.recipients))
    if draw(st.booleans()):
        data += b"@* crash\n"
    if draw(st.booleans()):
        data += b"@* held\n"
    original = data
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["cut", "flip", "insert", "delete"]))
        if action == "cut":
            data = data[:where]
        elif action == "flip" and where < len(data):
            data = data[:where] + bytes([data[where] ^ draw(st.integers(1, 255))]) + data[where + 1:]
        elif action == "insert":
            data = data[:where] + draw(st.binary(min_size=1, max_size=8)) + data[where:]
        elif action == "delete":
            data = data[:where] + data[where + draw(st.integers(1, 8)):]
    return queue_file, original, data


@PROPERTY
@given(mutated_files())
def test_mutated_files_never_raise_anything_but_corrupt_queue_file(case):
    _, _, data = case
    try:
        parse(data, WHERE)
    except CorruptQueueFile as exc:
        assert str(exc).startswith(WHERE + ":")


@PROPERTY
@given(queue_files(), st.data())
def test_file_cut_before_the_end_of_its_message_is_never_accepted(queue_file, data):
    whole = queue_file.to_bytes()
    length = data.draw(st.integers(0, len(whole) - 1))
    with pytest.raises(CorruptQueueFile):
        parse(whole[:length], WHERE)


# -- the documentation --------------------------------------------------------------------


def doc_block(name: str) -> str:
    """The fenced block after `<!-- example: name -->` in docs/queue-format.md."""
    match = re.search(rf"<!-- example: {name} -->\n```\w*\n(.*?\n)```\n", DOC.read_text(), re.DOTALL)
    assert match, f"no example {name!r} in {DOC}"
    return match[1]


def test_doc_new_file_example_is_what_qrouter_itself_writes():
    data = doc_block("new").encode()
    parsed = parse(data, "example")
    assert parsed.sender == ""
    assert [r.address for r in parsed.recipients] == ["postmaster@example.org", "jörg@bücher.example"]
    assert is_queue_id(parsed.queue_id) and arrival_of(parsed.queue_id) == parsed.arrival
    assert parsed.message.startswith(b"From: MAILER-DAEMON@") and parsed.message.endswith(b"delivered.\n")
    assert parsed.to_bytes() == data


def test_doc_journal_example_reads_as_described():
    data = doc_block("journal").encode()
    parsed = parse(data, "example")
    assert [(r.address, r.state) for r in parsed.recipients] == [
        ("bob@example.org", DELIVERED), ("carol@example.net", DELIVERED), ("dave@example.com", PENDING)]
    assert parsed.recipients[1].reply == "250 2.0.0 Ok"
    assert parsed.journal_bytes == len(journal_record(1, parsed.recipients[1]))
    assert is_queue_id(parsed.queue_id) and arrival_of(parsed.queue_id) == parsed.arrival
    assert parsed.message.endswith(b"Noon on Friday?\n")


def test_doc_crashes_example_reads_as_described():
    data = doc_block("crashes").encode()
    parsed = parse(data, "example")
    assert parsed.crashes == qf.POISON_CRASHES == 3
    assert parsed.journal_bytes == len(b"@* crash\n")
    assert is_queue_id(parsed.queue_id) and arrival_of(parsed.queue_id) == parsed.arrival
    assert parsed.message == b"Subject: a message that kills workers\n\nHi Bob\n"
    parsed.crashes -= 1
    assert parsed.to_bytes() == data[:-parsed.journal_bytes]  # the header is what qrouter writes


def test_doc_perl_listing_is_the_tested_script():
    assert doc_block("perl") == PERL_WRITER.read_text()


def test_doc_tables_list_exactly_the_keys_the_reader_knows():
    documented = set(re.findall(r"^\| `(\w+)`", DOC.read_text(), re.MULTILINE))
    assert documented == qf._ENVELOPE_KEYS | qf._RECIPIENT_KEYS | {"rcpt"}


# -- a Perl writer built from the documentation -------------------------------------------


def perl_write(spool: Path, sender: str, *recipients: str, message: bytes, umask: int = 0o022):
    return subprocess.run([PERL, str(PERL_WRITER), str(spool), sender, *recipients], input=message,
                          capture_output=True, timeout=30, umask=umask)


MESSAGE = (b"Return-Path: <>\r\nSubject: =?utf-8?q?R=C3=BCckl=C3=A4ufer?=\r\n\r\n"
           b"size 1\n\n@0 state delivered\r\n.\r\n..dots\r\n" + bytes(range(256)) + b"\nno final newline")


def test_perl_writer_makes_a_file_qrouter_reads(tmp_path):
    spool = Spool(tmp_path / "spool", group="")
    spool.create()
    before = time.time()
    result = perl_write(spool.root, "<>", "user@example.org", "<jörg@bücher.example>", message=MESSAGE,
                        umask=0o077)
    assert result.returncode == 0, result.stderr.decode()
    queue_id = result.stdout.decode().strip()
    assert is_queue_id(queue_id)
    assert before - 1 <= arrival_of(queue_id) <= time.time() + 1
    assert spool.list("incoming") == [queue_id] and spool.list("tmp") == []
    path = spool.path("incoming", queue_id)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660  # readable by the spool group whatever the umask
    with open(path, "rb") as handle:
        parsed = parse(handle.read(), path)
    assert parsed.queue_id == queue_id and parsed.arrival == arrival_of(queue_id)
    assert parsed.sender == "" and parsed.attempts == 0
    assert [(r.address, r.state) for r in parsed.recipients] == [
        ("user@example.org", PENDING), ("jörg@bücher.example", PENDING)]
    assert parsed.message == MESSAGE and parsed.journal_bytes == 0


def test_perl_writer_ids_are_unique_and_sort_by_arrival(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    ids = []
    for n in range(5):
        result = perl_write(spool.root, "a@example.org", "b@example.org", message=b"%d\n" % n)
        assert result.returncode == 0, result.stderr.decode()
        ids.append(result.stdout.decode().strip())
    assert sorted(ids) == ids and len(set(ids)) == 5
    assert sorted(spool.list("incoming")) == ids


def test_perl_writer_refuses_bad_addresses_and_reports_failure_to_queue(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    result = perl_write(spool.root, "a@example.org", "b@example.org\r\nRCPT TO:<c@example.org>", message=b"x")
    assert result.returncode == 64
    assert b"address contains CR, LF or NUL" in result.stderr
    result = perl_write(spool.root, "a@example.org", "<>", message=b"x")
    assert result.returncode == 64 and b"<> is not a valid recipient" in result.stderr
    result = perl_write(spool.root, "a@example.org", message=b"x")
    assert result.returncode == 64 and b"usage:" in result.stderr
    os.rmdir(spool.path("incoming"))
    result = perl_write(spool.root, "a@example.org", "b@example.org", message=b"x")
    assert result.returncode == 75 and b"cannot rename" in result.stderr
    assert spool.list("tmp") == []  # the staged file is not left behind


def test_perl_queued_message_is_delivered_byte_for_byte(daemons):
    daemon = daemons()
    result = perl_write(daemon.spool, "<>", "user@example.org", "jörg@Bücher.example", message=MESSAGE)
    assert result.returncode == 0, result.stderr.decode()
    queue_id = result.stdout.decode().strip()
    wait_for(lambda: len(daemon.delivered()) == 2, what="two deliveries")
    delivered = {str(p.parent.parent.relative_to(daemon.mail)): message_in(p) for p in daemon.delivered()}
    assert delivered == {"example.org/user": MESSAGE, "bücher.example/jörg": MESSAGE}
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="removal")
    log = daemon.log()
    assert f"{queue_id}: to=<user@example.org>, relay=maildir[" in log
    assert f"{queue_id}: to=<jörg@Bücher.example>, relay=maildir[" in log
    assert log.count("status=sent") == 2
    for queue in ("tmp", "incoming", "active", "deferred", "corrupt", "hold"):
        assert daemon.files(queue) == [], queue


def test_unreadable_file_goes_to_corrupt_with_the_reason(daemons):
    daemon = daemons()
    queue_id = new_queue_id()
    data = header(*with_line(2, f"id {queue_id}"), "colour blue", message=b"x\n")
    staged, queued = daemon.spool / "tmp" / queue_id, daemon.spool / "incoming" / queue_id
    staged.write_bytes(data)
    os.rename(staged, queued)
    (daemon.spool / "incoming" / "not-a-queue-id").write_bytes(data)
    wait_for(lambda: daemon.files("corrupt") == sorted([queue_id, "not-a-queue-id"]), what="files in corrupt/")
    assert (daemon.spool / "corrupt" / queue_id).read_bytes() == data
    wait_for(lambda: "unknown key" in daemon.log() and "not a queue id" in daemon.log(), what="the log lines")
    assert f"{daemon.spool / 'active' / queue_id}:7: unknown key 'colour'" in daemon.log()
    assert "incoming/not-a-queue-id: not a queue id; moved to corrupt/" in daemon.log()
    assert daemon.delivered() == []
