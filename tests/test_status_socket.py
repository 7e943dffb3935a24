"""The status socket must never hold up delivery: anyone in the spool group can connect to it, and
the supervisor serves it from the same event loop that hands out mail.

The daemon test attacks a real daemon (a client that drips a request one byte at a time, and 500
idle clients) and measures delivery latency against an undisturbed baseline. The unit tests drive
a StatusServer with a selector loop in a thread, the way the supervisor drives it.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from router.daemon import status_socket
from router.spool import Spool
from tests.daemon import Daemon, qrouter, wait_for

IDLE_CLIENTS = 500


# -- the daemon under attack -------------------------------------------------------------------

class Dripper(threading.Thread):
    """A client that sends one byte of a request every half second and never finishes it;
    dropped, it comes back."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                with connect(str(self.path)) as client:
                    while not self.stopped.wait(0.5):
                        client.sendall(b"{")
            except OSError:
                self.stopped.wait(0.5)

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)


def connect_idle(stack: ExitStack, path: Path, count: int) -> None:
    """Open `count` connections that never send anything, kept open until `stack` closes."""
    for number in range(count):
        try:
            stack.enter_context(connect(str(path)))
        except OSError as exc:
            raise AssertionError(f"idle client {number} could not connect: {exc}") from None


def connect(path: str, timeout: float = 5) -> socket.socket:
    """A connection to `path`, waiting at most `timeout` for the server to take it (a Unix socket
    refuses with EAGAIN, rather than waiting, while the server's backlog is full), and then
    `timeout` for each read."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setblocking(False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.connect(path)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                client.close()
                raise TimeoutError(f"the server did not take the connection within {timeout}s") from None
            time.sleep(0.01)
    client.settimeout(timeout)
    return client


def latency(daemon: Daemon, name: str) -> float:
    """Seconds from enqueue to the message in its Maildir."""
    start = time.monotonic()
    Spool(daemon.spool).enqueue("a@example.org", [f"{name}@example.org"], b"Subject: latency\n\nx\n")
    wait_for(lambda: daemon.delivered(f"example.org/{name}"), timeout=30, what=f"delivery to {name}")
    return time.monotonic() - start


def test_dripping_and_idle_status_clients_do_not_slow_delivery(daemons, open_files):
    open_files(IDLE_CLIENTS + 256)
    daemon = daemons()
    socket_path = daemon.spool / "status.sock"
    baseline = [latency(daemon, f"base{n}") for n in range(5)]
    dripper = Dripper(socket_path)
    dripper.start()
    try:
        with ExitStack() as idle:
            connect_idle(idle, socket_path, IDLE_CLIENTS)
            disturbed = []
            for number in range(10):
                time.sleep(0.1)  # spread over a second, while the dripper drips
                disturbed.append(latency(daemon, f"busy{number}"))
            answer = qrouter("status", "--queue-dir", str(daemon.spool), timeout=20)
            assert answer.returncode == 0, answer.stderr
    finally:
        dripper.stop()
    # against the baseline, not an absolute bound: a loaded machine slows both; a loop held up by
    # status clients adds seconds (a client's deadline is 5 s)
    assert statistics.median(disturbed) < statistics.median(baseline) + 0.5, \
        f"baseline {baseline}, disturbed {disturbed}"
    assert daemon.process.poll() is None


# -- StatusServer, driven as the supervisor drives it ------------------------------------------

BIG = 8 * 2**20  # far more than a socket buffer holds


def answer(request: dict[str, Any], uid: int) -> dict[str, Any]:
    if request.get("command") == "big":
        return {"big": "x" * BIG}
    return {"echo": request, "uid": uid}


@contextmanager
def serving(tmp_path: Path, respond: Callable[[dict[str, Any], int], dict[str, Any]] = answer,
            **limits: Any) -> Iterator[str]:
    """A StatusServer at tmp_path/status.sock served by a selector loop in a thread that sleeps
    exactly as long as the server's deadlines allow, as the supervisor's loop does."""
    path = str(tmp_path / "status.sock")
    selector = selectors.DefaultSelector()
    server = status_socket.StatusServer(path, respond, selector, **limits)
    wake_read, wake_write = os.pipe()
    stopped = threading.Event()
    selector.register(wake_read, selectors.EVENT_READ, stopped.set)

    def loop() -> None:
        while not stopped.is_set():
            for key, _ in selector.select(server.expire()):
                key.data()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        os.write(wake_write, b"x")
        thread.join(10)
        server.close()
        selector.close()
        os.close(wake_read)
        os.close(wake_write)
    assert not thread.is_alive(), "the loop did not stop"
    assert not os.path.exists(path)




def read_all(client: socket.socket) -> bytes:
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    return data


def timed_query(path: str) -> float:
    start = time.monotonic()
    assert status_socket.query(path, {"command": "status"}, timeout=5) == {"echo": {"command": "status"}, "uid": 0}
    return time.monotonic() - start


@pytest.mark.parametrize(("request_line", "error"), [
    (b"hello\n", "bad request: Expecting value"),
    (b"[1, 2]\n", "bad request: request is not a JSON object"),
    (b"\xff\xfe\xfa\n", "bad request: "),
    (b"[" * 60000 + b"\n", "bad request: maximum recursion depth exceeded"),
])
def test_a_request_that_is_not_a_json_object_gets_an_error_reply(tmp_path, request_line, error):
    with serving(tmp_path) as path, connect(path) as client:
        client.sendall(request_line)
        reply = json.loads(read_all(client))
    assert reply["error"].startswith(error), reply


def test_an_oversize_request_gets_an_error_reply_and_is_closed(tmp_path):
    with serving(tmp_path) as path, connect(path) as client:
        client.sendall(b"{" + b" " * status_socket.MAX_REQUEST)  # no end of line in sight
        reply = read_all(client)  # ends: the server closed the connection
        assert json.loads(reply) == {"error": f"bad request: longer than {status_socket.MAX_REQUEST} bytes"}
        assert timed_query(path) < 3


def test_a_slow_client_is_closed_at_its_deadline_and_stalls_no_one(tmp_path):
    with serving(tmp_path, timeout=6.0) as path:
        start = time.monotonic()  # before connect: the server may accept before connect() returns
        with connect(path, timeout=10) as slow:
            for _ in range(4):
                slow.sendall(b"{")
                assert timed_query(path) < 3  # a stalled server would answer after the slow client's deadline
                time.sleep(0.1)
            assert read_all(slow) == b""
            assert 5.95 <= time.monotonic() - start < 9


def test_a_client_that_never_reads_a_large_answer_blocks_no_one(tmp_path):
    with serving(tmp_path, timeout=6.0) as path, connect(path) as greedy:
        greedy.sendall(b'{"command": "big"}\n')
        time.sleep(0.2)  # the server has written what the socket takes and waits for the rest
        assert timed_query(path) < 3  # a stalled server would answer after the greedy client's deadline
        greedy.settimeout(5)
        time.sleep(6.0)  # past the deadline: the rest of the answer is dropped
        received = read_all(greedy)
    assert 0 < len(received) < BIG


def test_beyond_the_connection_limit_the_oldest_is_dropped_and_a_query_gets_through(tmp_path):
    with serving(tmp_path, max_connections=8) as path, ExitStack() as stack:
        idle = [stack.enter_context(connect(path, timeout=0.5)) for _ in range(20)]
        assert timed_query(path) < 3  # not refused, and not left waiting (5 s) for a free place
        for client in idle[:13]:  # 12 dropped for the newer ones, one for the query
            assert client.recv(1) == b""
        for client in idle[13:]:
            client.settimeout(0.05)
            with pytest.raises(TimeoutError):
                client.recv(1)


def later_or_echo(request: dict[str, Any], uid: int) -> dict[str, Any] | status_socket.Later:
    if request.get("command") == "later":
        return status_socket.Later("question", lambda result: {"result": result})
    return answer(request, uid)


def test_a_client_waiting_for_a_later_answer_hears_finish_none_at_its_deadline(tmp_path):
    """Nothing settles the question: the waiting client gets its answer at its deadline, never
    silence; one that hangs up meanwhile is dropped; others are answered at once all along."""
    with serving(tmp_path, later_or_echo, timeout=5.0) as path:  # room for the query before the deadline
        with connect(path) as quitter:
            quitter.sendall(b'{"command": "later"}\n')
        start = time.monotonic()  # before connect: the server may accept before connect() returns
        with connect(path) as waiting:
            waiting.sendall(b'{"command": "later"}\n')
            timed_query(path)
            waiting.setblocking(False)
            with pytest.raises(BlockingIOError):  # answered others while it still waits
                waiting.recv(1)
            waiting.setblocking(True)
            reply = json.loads(read_all(waiting))
            assert reply == {"result": None}
            assert time.monotonic() - start >= 4.95


def test_a_waiting_client_dropped_for_a_new_one_hears_finish_none_first(tmp_path):
    """At max_connections a new client drops the oldest; one waiting for a Later gets its answer."""
    asked: list[dict[str, Any]] = []

    def respond(request: dict[str, Any], uid: int) -> dict[str, Any] | status_socket.Later:
        asked.append(request)
        return later_or_echo(request, uid)

    with serving(tmp_path, respond, timeout=30.0, max_connections=2) as path, \
            connect(path) as waiting, connect(path) as other:
        waiting.sendall(b'{"command": "later"}\n')
        other.sendall(b'{"command": "later"}\n')
        wait_for(lambda: len(asked) == 2, what="both requests read")
        timed_query(path)  # a third connection: the oldest is dropped
        assert json.loads(read_all(waiting)) == {"result": None}
