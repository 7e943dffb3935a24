"""The dispatcher's decisions on their own, with no process and no file: windows that grow while
busy and close with failure, dead destinations and their probes, entries that go, wait or are
suspended each on its own destination, exact connection limits over several workers, and
waiting for a kind of worker rather than for a destination."""

from __future__ import annotations

from router.daemon.dispatcher import READY_BUDGET, Dispatcher, Limits, Routed

NETWORK, LOCAL = "network", "local"


def dispatcher(routes: dict[str, Routed], limit: int = 20, window: int = 5, probe: float = 10) -> Dispatcher:
    """A dispatcher whose messages are routed as `routes` says."""
    return Dispatcher(lambda name: Limits(limit, min(window, limit)), probe, lambda queue, qid: routes.get(qid))


def test_the_window_grows_only_while_the_destination_is_busy_up_to_it_and_never_passes_the_limit():
    routes = {f"m{i}": Routed(("smtp:a",), NETWORK) for i in range(400)}
    d = dispatcher(routes, limit=8)
    for i in range(20):  # one message at a time: never busy up to the window
        d.ready("incoming", f"m{i}")
        [(_, task)] = d.dispatch({1: (NETWORK, 100)}, 0)[0]
        d.finished(task.queue_id, {"smtp:a": ""}, 0)
        d.forget(task.queue_id)
    assert d.get("smtp:a").window == 5
    for i in range(20, 400):
        d.ready("incoming", f"m{i}")
    in_flight = []
    for _ in range(100):  # a stream that keeps it busy
        tasks, _ = d.dispatch({1: (NETWORK, 100)}, 0)
        in_flight += [task.queue_id for _, task in tasks]
        assert d.get("smtp:a").in_flight <= int(d.get("smtp:a").window) <= 8
        done = in_flight.pop(0)
        d.finished(done, {"smtp:a": ""}, 0)
        d.forget(done)
    assert d.get("smtp:a").window == 8


def test_a_round_of_failures_kills_a_destination_its_mail_is_suspended_and_the_probe_revives_it():
    routes = {f"m{i}": Routed(("smtp:down",), NETWORK) for i in range(10)}
    d = dispatcher(routes)
    for i in range(10):
        d.ready("incoming", f"m{i}")
    tasks, suspensions = d.dispatch({1: (NETWORK, 100)}, 0)
    assert len(tasks) == 5 and not suspensions  # the initial window
    died = []
    for _, task in tasks:
        died += d.finished(task.queue_id, {"smtp:down": "connect to down: Connection refused"}, 1)[1]
        assert d.filed(task.queue_id, "deferred", 100) == 100
    destination = d.get("smtp:down")
    assert died == [destination] and destination.dead and destination.dead_until == 11
    tasks, suspensions = d.dispatch({1: (NETWORK, 100)}, 5)
    assert not tasks and [s.queue_id for s in suspensions] == [f"m{i}" for i in range(5, 10)]
    assert all(11 <= s.due <= 12 for s in suspensions)  # the probe time, spread a little
    assert len(destination.deferred) == 10
    d.ready("deferred", "m5", retry=True)
    d.ready("deferred", "m6", retry=True)
    tasks, suspensions = d.dispatch({1: (NETWORK, 100)}, 11)
    assert [t.queue_id for _, t in tasks] == ["m5"] and [s.queue_id for s in suspensions] == ["m6"]  # one probe
    revived, _ = d.finished("m5", {"smtp:down": ""}, 12)
    d.forget("m5")
    assert revived == [destination] and not destination.dead and destination.window == 1
    assert d.recover(destination, 12) == 9 and not destination.deferred
    assert len(d.schedule) == 9 and 12 < d.schedule.next_due() <= 12 + 30


def test_a_dead_destination_suspends_only_its_own_entries():
    routes = {"m": Routed(("smtp:ok", "smtp:dead", "smtp:full"), NETWORK)}
    d = dispatcher(routes, limit=1, window=1)
    dead, full = d.get("smtp:dead"), d.get("smtp:full")
    dead.dead_until, dead.last_error = 50.0, "connection refused"
    full.in_flight = 1
    d.ready("incoming", "m")
    [(_, task)] = d.dispatch({1: (NETWORK, 10)}, 0)[0]
    assert task.go == ["smtp:ok"] and task.later == ["smtp:full"]
    assert task.suspended == {"smtp:dead": ("delivery temporarily suspended: smtp:dead: connection refused", 50.0)}
    d.finished("m", {"smtp:ok": ""}, 1)
    assert d.filed("m", "deferred", 50.0) is None  # its entry for smtp:full still waits
    full.in_flight = 0
    [(_, task)] = d.dispatch({1: (NETWORK, 10)}, 2)[0]
    assert task.go == ["smtp:full"] and task.due == 50.0 and not task.later and not task.suspended
    d.finished("m", {"smtp:full": "timed out"}, 3)
    assert d.filed("m", "deferred", 400.0) == 50.0  # the activation is over: the earliest retry asked for


def test_a_message_whose_destinations_are_all_dead_is_seen_by_a_worker_when_it_expires():
    routes = {"old": Routed(("smtp:dead",), NETWORK, visit_at=30.0), "new": Routed(("smtp:dead",), NETWORK)}
    d = dispatcher(routes)
    d.get("smtp:dead").dead_until = 1000.0
    d.ready("deferred", "new")
    d.ready("deferred", "old")
    tasks, suspensions = d.dispatch({1: (NETWORK, 10)}, 20)
    assert not tasks and {s.queue_id: s.due for s in suspensions} == {"new": suspensions[0].due, "old": 30.0}
    d.ready("deferred", "old", retry=True)
    [(_, task)] = d.dispatch({1: (NETWORK, 10)}, 30)[0]  # expires now: a worker records and reports it
    assert task.queue_id == "old" and task.go == [] and "smtp:dead" in task.suspended


def test_connections_in_use_and_kept_over_all_workers_never_pass_the_limit():
    routes = {f"m{i}": Routed(("smtp:one",), NETWORK) for i in range(4)}
    d = dispatcher(routes, limit=1, window=1)
    d.ready("incoming", "m0")
    [(pid, task)] = d.dispatch({1: (NETWORK, 1), 2: (NETWORK, 5)}, 0)[0]
    assert pid == 2  # the most free sessions
    d.kept(2, {"smtp:one": 1}, 1)  # the report: the connection is kept idle there
    d.finished("m0", {"smtp:one": ""}, 0)
    d.forget("m0")
    d.ready("incoming", "m1")
    [(pid, task)] = d.dispatch({1: (NETWORK, 5), 2: (NETWORK, 1)}, 0)[0]
    assert pid == 2  # the worker that keeps a connection to it, though the other has more room
    d.kept(2, {"smtp:one": 1}, 2)  # m1's report: the connection it reused is idle again
    d.finished("m1", {"smtp:one": ""}, 0)
    d.forget("m1")
    d.ready("incoming", "m2")
    d.ready("incoming", "m3")
    assert d.dispatch({1: (NETWORK, 5)}, 0) == ([], [])  # worker 2 is full: a new connection would be a second
    assert d.dispatch({1: (NETWORK, 5)}, 0) == ([], [])  # and they wait in line, turn after turn
    assert d.take_drops() == {2: {"smtp:one"}}  # so worker 2 is told to drop its idle one
    d.kept(2, {"smtp:one": 0}, 2)  # it did
    [(pid, task)] = d.dispatch({1: (NETWORK, 5)}, 0)[0]
    assert (pid, task.queue_id) == (1, "m2")


def test_an_entry_waits_for_its_kind_of_worker_and_goes_when_one_has_room():
    routes = {"pipe": Routed(("pipe:/bin/x",), LOCAL), "net": Routed(("smtp:a",), NETWORK)}
    d = dispatcher(routes)
    d.ready("incoming", "pipe")
    d.ready("incoming", "net")
    [(pid, task)] = d.dispatch({1: (NETWORK, 5), 2: (LOCAL, 0)}, 0)[0]
    assert task.queue_id == "net"
    assert not d.get("pipe:/bin/x").waiting  # not waiting for its destination: that one has room
    [(pid, task)] = d.dispatch({2: (LOCAL, 1)}, 0)[0]
    assert (pid, task.queue_id) == (2, "pipe")


def test_a_rate_spaces_the_starts():
    routes = {f"m{i}": Routed(("smtp:slow",), NETWORK) for i in range(5)}
    d = Dispatcher(lambda name: Limits(20, 5, rate=2.0), 10, lambda queue, qid: routes.get(qid))
    for i in range(5):
        d.ready("incoming", f"m{i}")
    assert len(d.dispatch({1: (NETWORK, 10)}, 100.0)[0]) == 1
    assert d.dispatch({1: (NETWORK, 10)}, 100.2)[0] == []
    assert abs(d.next_wakeup(100.2) - 0.3) < 1e-9
    assert len(d.dispatch({1: (NETWORK, 10)}, 100.5)[0]) == 1


def test_mx_domains_wait_for_their_site_then_share_its_limit_and_an_opted_out_one_stays_apart():
    routes = {f"m{i}": Routed((f"mx:d{i % 3}.example",), NETWORK) for i in range(6)}
    routes["apart"] = Routed(("mx:apart.example",), NETWORK)
    d = Dispatcher(lambda name: Limits(2, 2, mx_rollup=name != "mx:apart.example"), 10,
                   lambda queue, qid: routes.get(qid))
    for queue_id in routes:
        d.ready("incoming", queue_id)
    [(_, task)] = d.dispatch({1: (NETWORK, 10)}, 0)[0]  # only the one kept apart: the others wait for their site
    assert task.queue_id == "apart" and d.get("mx:apart.example").limits.concurrency == 2
    assert sorted(d.take_lookups(0)) == ["mx:d0.example", "mx:d1.example", "mx:d2.example"]
    for i in range(3):
        d.site_found(f"mx:d{i}.example", "site:mx1.example,mx2.example", 1)
    tasks, _ = d.dispatch({1: (NETWORK, 10)}, 1)
    assert len(tasks) == 2  # the site's limit, over three domains
    site = d.get("site:mx1.example,mx2.example")
    assert site.in_flight == 2 and len(site.domains) == 3 and len(site.lined) == 4
    assert d.sites_of(["mx:d0.example", "mx:apart.example"]) == {"mx:d0.example": "site:mx1.example,mx2.example"}


def test_idle_destinations_and_stale_sites_are_let_go_and_busy_or_dead_ones_kept():
    routes = {"a": Routed(("smtp:idle",), NETWORK), "b": Routed(("smtp:busy",), NETWORK)}
    d = dispatcher(routes)
    d.ready("incoming", "a")
    d.ready("incoming", "b")
    d.dispatch({1: (NETWORK, 10)}, 0)
    d.finished("a", {"smtp:idle": ""}, 1)
    d.forget("a")
    d.get("smtp:dead").dead_until = 100.0
    d.site_found("mx:x.example", "site:mx.example", 0)  # believed for an hour
    d.forget_idle(2)
    assert sorted(d.destinations) == ["smtp:busy", "smtp:dead"]  # in flight, and dead
    d.forget_idle(2 + 3600)
    assert not d.sites


def test_an_idle_connection_promised_to_an_entry_is_not_promised_again_by_an_older_report():
    """A worker's count may have been taken before it read the tasks that will reuse its idle
    connections: the promises in tasks it had not read are subtracted, so none is promised twice."""
    routes = {f"m{i}": Routed(("smtp:one",), NETWORK) for i in range(4)}
    d = dispatcher(routes, limit=2, window=2)
    d.get("smtp:one")
    d.kept(7, {"smtp:one": 2}, 0)  # worker 7 keeps two idle connections
    d.ready("incoming", "m0")
    d.ready("incoming", "m1")
    tasks, _ = d.dispatch({7: (NETWORK, 10)}, 0)
    assert [(pid, task.number, task.reuse) for pid, task in tasks] == [(7, 1, ["smtp:one"]), (7, 2, ["smtp:one"])]
    d.kept(7, {"smtp:one": 2}, 0)  # counted before it read tasks 1 and 2
    d.get("smtp:one").window = 4.0  # the window is not what holds the next ones back
    d.ready("incoming", "m2")
    d.ready("incoming", "m3")
    assert d.dispatch({7: (NETWORK, 10), 8: (NETWORK, 10)}, 0)[0] == []  # no third promise, no new connection
    d.kept(7, {"smtp:one": 0}, 2)  # both read and begun
    d.kept(7, {"smtp:one": 1}, 2)  # m0's report: its connection is idle again
    d.finished("m0", {"smtp:one": ""}, 1)
    d.forget("m0")
    [(pid, task)] = d.dispatch({7: (NETWORK, 10), 8: (NETWORK, 10)}, 1)[0]
    assert (pid, task.queue_id, task.reuse) == (7, "m2", ["smtp:one"])  # m0's connection, free again


def test_the_entries_that_go_in_a_later_task_of_an_activation_are_not_another_attempt():
    routes = {"m": Routed(("smtp:a", "smtp:full"), NETWORK)}
    d = dispatcher(routes, limit=1, window=1)
    d.get("smtp:full").in_flight = 1
    d.ready("incoming", "m")
    [(_, first)] = d.dispatch({1: (NETWORK, 10)}, 0)[0]
    assert first.go == ["smtp:a"] and not first.continued and first.record().get("continued") is None
    d.finished("m", {"smtp:a": ""}, 1)
    d.filed("m", "deferred", 100.0)
    d.get("smtp:full").in_flight = 0
    [(_, second)] = d.dispatch({1: (NETWORK, 10)}, 2)[0]
    assert second.go == ["smtp:full"] and second.continued and second.record()["continued"] is True


def test_a_new_policy_routes_again_what_waits_and_what_comes_back_so_every_limit_holds():
    """A drain begins (every recipient to the peer): the messages waiting for the slow destination
    are counted against the peer's limit from then on, those in flight once their worker has filed
    them, and an entry that went in an activation does not go again in it."""
    routes = {f"m{i}": Routed(("smtp:slow",), LOCAL) for i in range(40)}
    d = Dispatcher(lambda name: Limits(2, 2) if name == "smtp:peer" else Limits(10, 10), 10,
                   lambda queue, qid: routes.get(qid))
    for i in range(40):
        d.ready("incoming", f"m{i}")
    tasks, _ = d.dispatch({1: (LOCAL, 100)}, 0)
    old = [task.queue_id for _, task in tasks]
    assert len(old) == 10 and len(d.get("smtp:slow").waiting) == 30
    routes.update((qid, Routed(("smtp:peer",), NETWORK)) for qid in routes)  # the drained policy
    d.rerouted()
    assert not d.get("smtp:slow").waiting
    sent: list[str] = []
    in_flight: list[str] = []
    for turn in range(200):
        tasks, _ = d.dispatch({2: (NETWORK, 100)}, turn)
        assert all(task.go == ["smtp:peer"] for _, task in tasks)
        in_flight += [task.queue_id for _, task in tasks]
        assert d.get("smtp:peer").in_flight == len(in_flight) <= 2
        if old:  # the old worker files what it had: deferred at the slow destination, so it goes to the peer
            done = old.pop()
            d.finished(done, {"smtp:slow": "451 4.3.0 later"}, turn)
            assert d.filed(done, "deferred", turn + 3600) is None
        if in_flight:
            done = in_flight.pop(0)
            d.finished(done, {"smtp:peer": ""}, turn)
            d.forget(done)
            sent.append(done)
    assert sorted(sent) == sorted(routes) and not d.jobs

    # A reload that routes as before: a message in flight gets no second attempt in its activation.
    d.ready("incoming", "m0")
    [(_, task)] = d.dispatch({2: (NETWORK, 100)}, 300)[0]
    assert task.go == ["smtp:peer"]
    d.rerouted()
    d.finished("m0", {"smtp:peer": "451 4.3.0 later"}, 301)
    assert d.filed("m0", "deferred", 4000) == 4000 and not d.jobs


def test_a_new_policy_routes_a_large_backlog_again_a_budget_a_turn():
    """Each routing reads an envelope: after a policy change, a backlog of 5,000 messages waiting
    for a slow destination is routed again READY_BUDGET a turn, so that the loop serves its
    workers and clients between turns; none goes by the old policy meanwhile, and all are routed."""
    count = 5000
    routes = {f"m{i}": Routed(("smtp:slow",), NETWORK) for i in range(count)}
    reads: list[str] = []

    def route(queue: str, queue_id: str) -> Routed | None:
        reads.append(queue_id)
        return routes.get(queue_id)

    d = Dispatcher(lambda name: Limits(1, 1), 10, route)
    for i in range(count):
        d.ready("incoming", f"m{i}")
    for turn in range(3):  # READY_BUDGET routed a turn; one of them goes, the others wait
        d.dispatch({1: (NETWORK, 100)}, turn)
    assert len(d.get("smtp:slow").waiting) == count - 1
    routes.update((qid, Routed(("smtp:peer",), NETWORK)) for qid in routes)
    reads.clear()
    d.rerouted()
    turns = 0
    while True:  # the supervisor turns again at once while more_ready
        tasks, _ = d.dispatch({1: (NETWORK, 100)}, 10 + turns)
        assert len(reads) <= READY_BUDGET, f"{len(reads)} envelopes read in one turn"
        assert all(task.go == ["smtp:peer"] for _, task in tasks)
        reads.clear()
        turns += 1
        if not d.more_ready:
            break
    assert turns >= count // READY_BUDGET
    assert len(d.get("smtp:peer").waiting) == count - 2  # one in flight at each destination
