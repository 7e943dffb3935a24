"""What every front door lets into the queue and the logs: one address check (router/spool/address.py)
whichever door the mail comes in by, no CR, LF or NUL from a caller in a queue file, and one log
line per log call whatever characters the addresses and replies hold.

The commands run as subprocesses, as a user or cron would run them."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from router.logs import target as log_module
from router.spool import Spool
from router.spool.queue_file import parse
from tests.daemon import qrouter, wait_for
from tests.test_sendmail import ENTRIES, ME, queued, sendmail

CR_LF_NUL = "contains CR, LF or NUL"


@pytest.fixture
def spool(tmp_path) -> Path:
    path = tmp_path / "spool"
    Spool(path).create()
    return path


@pytest.fixture
def config(tmp_path, spool) -> Path:
    """A config file naming `spool` and `me`, and a small message-size-limit."""
    path = tmp_path / "qrouter.conf"
    path.write_text(f"queue-dir {spool}\nme {ME}\nmessage-size-limit 1000\n")
    return path


def refused(result: subprocess.CompletedProcess, spool: Path, *complaints: str) -> str:
    """Assert a usage error (64) whose message holds every complaint, with nothing queued."""
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 64, stderr
    assert all(complaint in stderr for complaint in complaints), stderr
    assert result.stdout == b""
    assert queued(spool) == []
    return stderr


def queue_files(spool: Path):
    return [parse((spool / "incoming" / name).read_bytes()) for name in sorted(os.listdir(spool / "incoming"))]


# -- CR, LF and NUL: refused at every door, naming the argument ----------------------------------

@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(("args", "complaint"), [
    (["--", "a@b.test\r\nRCPT TO:<evil@x.test>"], "recipient 'a@b.test\\r\\nRCPT TO:<evil@x.test>'"),
    (["--", "a@b.test\n"], "recipient 'a@b.test\\n'"),
    (["ok@b.test", "a@b.test\rRCPT TO:<evil@x.test>"], "recipient 'a@b.test\\rRCPT TO:<evil@x.test>'"),
    (["-f", "s@x.test\r\nRCPT TO:<evil@x.test>", "a@b.test"], "-f 's@x.test\\r\\nRCPT TO:<evil@x.test>'"),
    (["-f", "s@x.test\n", "a@b.test"], "-f 's@x.test\\n'"),
    (["-fs@x.test\r", "a@b.test"], "-f 's@x.test\\r'"),
    (["-V", "job\r\n42", "a@b.test"], "-V 'job\\r\\n42'"),
    (["-N", "never\n", "a@b.test"], "-N 'never\\n'"),
    (["-R", "hdrs\r", "a@b.test"], "-R 'hdrs\\r'"),
])
def test_sendmail_refuses_cr_lf_in_any_argument(spool, config, entry, args, complaint):
    refused(sendmail("--config", str(config), "-f", "s@x.test", *args, stdin=b"Subject: x\n\nx\n", entry=entry),
            spool, complaint, CR_LF_NUL)


@pytest.mark.parametrize("header", [
    b"To: a@b.test\rRCPT TO:<evil@x.test>\n",
    b"To: ok@b.test,\n a@b.test\rRCPT TO:<evil@x.test>\n",
    b"Cc: a@b.test\x00evil@x.test\n",
    b"Bcc: <a@b.test\r>\n",
])
def test_sendmail_t_refuses_cr_lf_nul_in_header_addresses(spool, config, header):
    field = header.split(b":")[0].decode()
    refused(sendmail("--config", str(config), "-t", stdin=header + b"Subject: x\n\nx\n"),
            spool, f"{field}: header", CR_LF_NUL)


@pytest.mark.parametrize(("args", "stdin", "complaint"), [
    (["a@b.test RCPT TO:<evil@x.test>"], b"x\n", "group name 'a@b.test RCPT TO' is not"),
    (["-t"], b"To: a@b.test RCPT TO:<evil@x.test>\n\nx\n", "group name 'a@b.test RCPT TO' is not"),
    (["-t"], b"Cc: a@b.test, c@[x-tag:y] list: evil@x.test;\n\nx\n", "group name 'c@[x-tag:y] list' is not"),
])
def test_sendmail_never_takes_addresses_for_a_group_name(spool, config, args, stdin, complaint):
    refused(sendmail("--config", str(config), *args, stdin=stdin), spool, complaint)


# -- one address check for every door ---------------------------------------------------------

LITERALS = ["a@[IPv6:::1]", "a@[x-tag:text]", "root@[IPv6:2001:db8::1]", '"a:b,c"@[192.0.2.1]']


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("address", LITERALS)
def test_sendmail_queues_domain_literals_and_quoted_strings_whole(spool, config, entry, address):
    result = sendmail("--config", str(config), "-f", address, address, f"Name <{address}>, other@b.test",
                      stdin=b"Subject: x\n\nx\n", entry=entry)
    assert (result.returncode, result.stderr) == (0, b"")
    [stored] = queue_files(spool)
    assert (stored.sender, [r.address for r in stored.recipients]) == (address, [address, "other@b.test"])


def test_sendmail_t_reads_domain_literals_in_headers(spool, config):
    message = (b"To: a@[IPv6:::1], Tagged <a@[x-tag:text]>\n"
               b"Cc: group: \"q:;,\"@[192.0.2.1] (a comment, with: specials);\n"
               b"Subject: x\n\nx\n")
    result = sendmail("--config", str(config), "-t", stdin=message)
    assert (result.returncode, result.stderr) == (0, b"")
    [stored] = queue_files(spool)
    assert [r.address for r in stored.recipients] == ["a@[IPv6:::1]", "a@[x-tag:text]", '"q:;,"@[192.0.2.1]']


@pytest.mark.parametrize("address", LITERALS)
def test_qrouter_enqueue_and_sendmail_agree(spool, config, address):
    """The same address, the same verdict and the same queue file entry by either command."""
    enqueued = qrouter("enqueue", "--queue-dir", str(spool), "-f", address, address, stdin=b"x\n")
    assert enqueued.returncode == 0, enqueued.stderr
    assert sendmail("--config", str(config), "-f", address, address, stdin=b"x\n").returncode == 0
    first, second = queue_files(spool)
    assert (first.sender, first.recipients) == (second.sender, second.recipients)


# -- message-size-limit ------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ENTRIES)
def test_sendmail_refuses_a_message_over_message_size_limit(spool, config, entry):
    refused(sendmail("--config", str(config), "a@b.test", stdin=b"x" * 1999 + b"\n", entry=entry),
            spool, "message is larger than message-size-limit (1000 bytes)")
    # The limit is on the message as queued, with the header lines qrouter adds (Received:, and
    # From:, Date: and Message-ID: when missing). A lone dot ends the message, however long the rest.
    ok = sendmail("--config", str(config), "a@b.test", stdin=b"x" * 599 + b"\n")
    assert (ok.returncode, ok.stderr) == (0, b"")
    ok = sendmail("--config", str(config), "a@b.test", stdin=b"x" * 597 + b"\n.\n" + b"y" * 5000)
    assert (ok.returncode, ok.stderr) == (0, b"")
    assert sorted(f.message.rpartition(b"\n\n")[2] for f in queue_files(spool)) == sorted(
        [b"x" * 599 + b"\n", b"x" * 597 + b"\n"])


# -- logs: one line per call whatever the text -------------------------------------------------

SEPARATORS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\x85", "\x0b": "\\x0b", "\x0c": "\\x0c",
              "\r": "\\r", "\n": "\\n", "\x00": "\\x00", "\x1c": "\\x1c", "\x7f": "\\x7f", "\x9b": "\\x9b",
              "\u200e": "\\u200e", "\ufeff": "\\ufeff", "\udcff": "\\udcff"}


@pytest.fixture
def log_file(tmp_path):
    """router.logs.target.setup to a file; the `qrouter` logger is put back as it was afterwards."""
    logger = logging.getLogger("qrouter")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    path = tmp_path / "qrouter.log"
    yield log_module.setup(str(path)), path
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:], logger.level, logger.propagate = saved


def test_every_log_call_is_one_line_with_the_escapes_visible(log_file):
    logger, path = log_file
    for char in SEPARATORS:
        logger.info("Q1: to=<a%sb@x.test>, status=sent (%s)", char, f"250 ok{char}RCPT TO:<evil@x.test>")
    logger.warning("plain jörg@bücher.example, tab\there")
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(SEPARATORS) + 2
    for line, escape in zip(lines[:-1], [*SEPARATORS.values(), "\\t"], strict=True):
        text = line.decode()
        assert text.isprintable() and escape in text, text
    assert lines[0].decode().endswith(f"qrouter/master[{os.getpid()}]: Q1: to=<a\\u2028b@x.test>, status=sent "
                                      "(250 ok\\u2028RCPT TO:<evil@x.test>)")
    assert lines[-2].decode().endswith("warning: plain jörg@bücher.example, tab\\there")


def test_a_traceback_may_follow_but_the_message_is_one_line(log_file):
    logger, path = log_file
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logger.exception("Q2: failed for <a\u2028b@x.test>\nsecond")
    first, *rest = path.read_text().split("\n")
    assert first.endswith("error: Q2: failed for <a\\u2028b@x.test>\\nsecond")
    assert rest[0] == "Traceback (most recent call last):" and "ValueError: bad" in path.read_text()


def test_enqueued_address_with_separators_logs_one_line_per_event(daemons):
    """End to end: `qrouter enqueue` into a running daemon's spool; its log is a file."""
    daemon = daemons()
    local = "x\u2028y\u2029z\x85w\u200ev"
    result = qrouter("enqueue", "--queue-dir", str(daemon.spool), "-f", f"s{local}@example.org",
                     f"{local}@one.example", stdin=b"Subject: separators\n\nx\n", check=True)
    queue_id = result.stdout.decode().strip()
    wait_for(lambda: f"{queue_id}: removed" in daemon.log(), what="delivery")
    assert daemon.delivered(f"one.example/{local}")
    raw = daemon.log_path.read_text()
    assert not any(char in raw for char in SEPARATORS if char not in "\n")
    lines = [line for line in raw.split("\n") if queue_id in line]
    assert len(lines) >= 2 and lines[-1].endswith(f"{queue_id}: removed")
    [delivery] = [line for line in lines if "to=<" in line]
    assert "to=<x\\u2028y\\u2029z\\x85w\\u200ev@one.example>" in delivery and "status=sent" in delivery
