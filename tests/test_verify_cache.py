"""The callout results kept in the spool (router/daemon/verify_cache.py), on real files: the file stays
bounded however often a result changes, expired results are gone after a restart, a damaged line
costs only itself, and a spool the cache cannot write leaves it working from memory."""

from __future__ import annotations

import json
import logging

from router.config import Config
from router.daemon.verify_cache import DAY, SLACK_LINES, Lifetimes, VerifyCache

LIFETIMES = Lifetimes(Config())  # Postfix's: 31 days positive, 3 days negative, 300 s temporary


def test_the_file_stays_bounded_however_often_results_change(tmp_path):
    cache = VerifyCache(str(tmp_path), LIFETIMES, 1000.0)
    for n in range(3 * SLACK_LINES):
        cache.put(f"u{n % 10}@example.org", "2.1.5", f"answer {n}", 1000.0 + n)
    cache.close()
    lines = (tmp_path / "verify-cache").read_text().splitlines()
    assert len(lines) <= 2 * 10 + SLACK_LINES, len(lines)
    again = VerifyCache(str(tmp_path), LIFETIMES, 1000.0 + 3 * SLACK_LINES)
    assert again.get("u9@example.org", 1000.0 + 3 * SLACK_LINES).text == f"answer {3 * SLACK_LINES - 1}"
    assert len(again.entries) == 10
    assert not (tmp_path / "verify-cache.new").exists()


def test_a_restart_forgets_what_expired_and_passes_over_damaged_lines(tmp_path):
    now = 10 * DAY
    records = [{"key": "old@example.org", "dsn": "5.1.1", "text": "no", "checked": now - 4 * DAY},
               {"key": "kept@example.org", "dsn": "5.1.1", "text": "no", "checked": now - DAY},
               {"key": "busy@example.org", "dsn": "4.4.1", "text": "later", "checked": now - 600},
               {"key": "good@example.org", "dsn": "2.1.5", "text": "ok", "checked": now - 30 * DAY}]
    text = "".join(json.dumps(record) + "\n" for record in records) + '{"key": "cut short", "dsn\n' + "[1, 2]\n"
    (tmp_path / "verify-cache").write_text(text)
    cache = VerifyCache(str(tmp_path), LIFETIMES, now)
    assert sorted(cache.entries) == ["good@example.org", "kept@example.org"]
    assert cache.get("good@example.org", now + 2 * DAY) is None, "31 days after its probe, a positive result is gone"


def test_a_cache_it_cannot_write_works_from_memory_and_says_so_once(tmp_path, caplog):
    spool = tmp_path / "spool"  # never made: as a spool whose directory went away
    cache = VerifyCache(str(spool / "missing-dir"), LIFETIMES, 0.0)
    with caplog.at_level(logging.WARNING, logger="qrouter"):
        for n in range(3):
            cache.put(f"u{n}@example.org", "2.1.5", "ok", float(n))
    assert [r.getMessage() for r in caplog.records].count(
        f"cannot write {spool}/missing-dir/verify-cache: No such file or directory; "
        "callout results are kept in memory only") == 1
    assert cache.get("u2@example.org", 3.0).dsn == "2.1.5"
