"""The results of callouts (recipient verification asking the next hop), kept in the spool so that
they survive a restart, as Postfix's verify(8) keeps its cache.

How long a result is kept depends on what it says (config keys, Postfix's defaults):

    deliverable (2.X.X)   verify-positive-expire 31 days, probed again after verify-positive-refresh 7
    refused (5.X.X)       verify-negative-expire 3 days, probed again after verify-negative-refresh 3 hours
    temporary (4.X.X)     verify-temporary-expire 300 seconds, then probed again when asked

A result past its refresh time is still given while a new probe runs in the background, so a
busy recipient never waits for one. The file (QUEUE-DIR/verify-cache) holds one JSON object a
line, appended as results come: {"key": address, "dsn": ..., "text": ..., "checked": time}. The
last line of a key wins. Once it holds more than twice the lines it needs, it is written afresh
(a new file renamed over it), without the expired results. It is a cache: a line lost to a crash
costs one probe, so nothing is fsynced, and a line that cannot be read is passed over.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from router.config import Config

log = logging.getLogger("qrouter")

FILE = "verify-cache"
MAX_ENTRIES = 200_000  # results kept at most: the newest; bounds memory and the start-up read
SLACK_LINES = 1_000  # lines the file may hold beyond twice its results before it is written afresh
DAY = 86400.0


@dataclass(frozen=True)
class Result:
    dsn: str
    text: str
    checked: float  # when the next hop said so (time.time())


class Lifetimes:
    """How long a result is given, and when it is probed again, by its status code's class."""

    def __init__(self, config: Config) -> None:
        self.expire = {"2": config.verify_positive_expire * DAY, "5": config.verify_negative_expire * DAY,
                       "4": config.verify_temporary_expire}
        self.refresh = {"2": config.verify_positive_refresh * DAY, "5": config.verify_negative_refresh * DAY,
                        "4": config.verify_temporary_expire}

    def expired(self, result: Result, now: float) -> bool:
        return now - result.checked >= self.expire.get(result.dsn[:1], 0.0)

    def refresh_due(self, result: Result, now: float) -> bool:
        return now - result.checked >= self.refresh.get(result.dsn[:1], 0.0)


class VerifyCache:
    """Results by key (the recipient, as rewritten), read from the spool at start."""

    def __init__(self, queue_dir: str, lifetimes: Lifetimes, now: float) -> None:
        self.path = os.path.join(queue_dir, FILE)
        self.lifetimes = lifetimes
        self.entries: dict[str, Result] = {}
        self.lines = 0
        self.trouble_logged = False
        self.fd = -1  # the file, open for appending once the first result comes
        self._read(now)

    def get(self, key: str, now: float) -> Result | None:
        """The result kept for `key`, unless it has expired (it is then forgotten)."""
        result = self.entries.get(key)
        if result is not None and self.lifetimes.expired(result, now):
            del self.entries[key]
            return None
        return result

    def put(self, key: str, dsn: str, text: str, now: float) -> Result:
        result = Result(dsn, text, now)
        self.entries.pop(key, None)
        self.entries[key] = result  # newest last: the oldest go first when there are too many
        self._trim()
        if self.lines + 1 > 2 * len(self.entries) + SLACK_LINES:
            self._rewrite(now)
        else:
            self._append([(key, result)])
        return result

    def set_lifetimes(self, lifetimes: Lifetimes) -> None:
        """A reload's new lifetimes apply to the results kept, too."""
        self.lifetimes = lifetimes

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _read(self, now: float) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    self.lines += 1
                    try:
                        record = json.loads(line)
                        result = Result(str(record["dsn"]), str(record["text"]), float(record["checked"]))
                        key = str(record["key"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a crash, or not ours
                    self.entries.pop(key, None)
                    self.entries[key] = result
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read %s: %s; callout results start empty", self.path, exc.strerror or exc)
            return
        self._forget_expired(now)
        self._trim()

    def _forget_expired(self, now: float) -> None:
        for key in [key for key, result in self.entries.items() if self.lifetimes.expired(result, now)]:
            del self.entries[key]

    def _trim(self) -> None:
        """The newest MAX_ENTRIES results are kept."""
        while len(self.entries) > MAX_ENTRIES:
            del self.entries[next(iter(self.entries))]

    def _append(self, results: list[tuple[str, Result]]) -> None:
        data = b"".join(json.dumps({"key": key, "dsn": result.dsn, "text": result.text,
                                    "checked": result.checked}).encode() + b"\n" for key, result in results)
        try:
            if self.fd < 0:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.write(self.fd, data)
        except OSError as exc:
            self._trouble(exc)
            return
        self.lines += len(results)

    def _rewrite(self, now: float) -> None:
        """Write the results that have not expired into a new file and put it in place."""
        self._forget_expired(now)
        self.close()
        staged = f"{self.path}.new"
        try:
            self.fd = os.open(staged, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._trouble(exc)
            return
        self.lines = 0
        self._append(list(self.entries.items()))
        try:
            os.rename(staged, self.path)
        except OSError as exc:
            self._trouble(exc)

    def _trouble(self, exc: OSError) -> None:
        """A cache that cannot be written works from memory; said once."""
        if not self.trouble_logged:
            self.trouble_logged = True
            log.warning("cannot write %s: %s; callout results are kept in memory only", self.path,
                        exc.strerror or exc)
