from __future__ import annotations

import pytest

from tests.daemon import Daemon


@pytest.fixture
def daemons(tmp_path):
    """Make daemons with `daemons(*args)`; every one still running is stopped after the test."""
    started: list[Daemon] = []

    def make(*args: str, workers: int = 2, start: bool = True, **kwargs) -> Daemon:
        daemon = Daemon(tmp_path, *args, workers=workers, **kwargs)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()
