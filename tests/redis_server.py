"""A real redis-server (Debian's redis-server package) of the test's own, on a free loopback port.

It runs in the foreground with its configuration given on the command line: 127.0.0.1 only,
no persistence (no dump, no append-only file), its working directory a temporary one. Debian's
own redis-server service, if one runs, is left alone on its port 6379.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import redis

from tests.smtp_servers import free_port

SERVER = "/usr/bin/redis-server"
HOST = "127.0.0.1"


class RedisServer:
    """Use as a context manager; `url` is the matching `cluster-redis` value."""

    def __init__(self, start_within: float = 15) -> None:
        self.start_within = start_within
        self.port = free_port(HOST)
        self.process: subprocess.Popen | None = None
        self._directory = tempfile.TemporaryDirectory(prefix="qrouter-redis-")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client of its own, to look at what the nodes asked (INFO commandstats)."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def start(self) -> Self:
        """Start it (again, after `kill`: empty, as a Redis that lost its memory)."""
        log = Path(self._directory.name) / "redis.log"
        self.process = subprocess.Popen(
            [SERVER, "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self._directory.name, "--daemonize", "no", "--protected-mode", "yes", "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=1)
        deadline = time.monotonic() + self.start_within
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    said = log.read_text(errors="replace") if log.exists() else ""
                    raise AssertionError(f"redis-server did not start on port {self.port}: {said}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """kill -9: gone at once, with everything it held."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._directory.cleanup()
