"""The scheduler's arithmetic on its own: windows that open with success and close with failure,
a destination found dead after a round of failures, its probe, and its recovery."""

from __future__ import annotations

from router.scheduler import INITIAL_WINDOW, Scheduler


def test_the_window_starts_small_grows_with_success_and_never_passes_the_limit():
    scheduler = Scheduler(limit=8, probe_seconds=10)
    names = ["smtp:mx.example"]
    started = 0
    while scheduler.blocker(names, 0) is None:
        scheduler.start(names, 0)
        started += 1
    assert started == INITIAL_WINDOW
    for _ in range(200):
        scheduler.finish(names, {names[0]: ""}, 0)
        scheduler.start(names, 0)
    assert scheduler.get(names[0]).window == 8


def test_a_round_of_failures_kills_a_destination_until_its_probe_reaches_it():
    scheduler = Scheduler(limit=20, probe_seconds=10)
    names = ["smtp:down.example"]
    for _ in range(5):
        scheduler.start(names, 0)
    died = []
    for _ in range(5):
        died += scheduler.finish(names, {names[0]: "connect to down.example: Connection refused"}, 1)[1]
    destination = scheduler.get(names[0])
    assert died == [destination] and destination.dead and destination.dead_until == 11
    assert scheduler.blocker(names, 5) is destination  # dead: nothing goes
    assert scheduler.blocker(names, 11) is None  # the probe may go
    scheduler.start(names, 11)
    assert scheduler.blocker(names, 11) is destination  # only the probe
    destination.deferred.update({"A", "B", "C"})
    revived, _ = scheduler.finish(names, {names[0]: ""}, 12)
    assert revived == [destination] and not destination.dead and destination.window == 1
    times = scheduler.recovery_times(destination, 12)
    assert [queue_id for queue_id, _ in times] == ["A", "B", "C"]
    assert all(12 < due <= 12 + 30 for _, due in times) and not destination.deferred


def test_a_failed_probe_leaves_it_dead_and_a_probe_that_never_got_there_frees_the_next():
    scheduler = Scheduler(limit=20, probe_seconds=10)
    names = ["lmtp:/run/lmtp"]
    destination = scheduler.get(names[0])
    destination.dead_until = 5.0
    scheduler.start(names, 6)
    scheduler.finish(names, {names[0]: "timed out"}, 7)
    assert destination.dead and destination.dead_until == 17 and not destination.probing
    scheduler.start(names, 17)
    scheduler.finish(names, {}, 18)  # its recipients went elsewhere: no word on this destination
    assert scheduler.blocker(names, 18) is None
