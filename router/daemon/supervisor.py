"""The supervisor: owns the spool, watches it with inotify, and feeds a pool of forked workers.

Shaped like a pre-fork arbiter: signals only queue themselves and wake the loop through a pipe;
the loop reaps children, replaces the ones that die, hands out work and answers the status
socket. Nothing here delivers mail or reads a message: the supervisor stays small and responsive
whatever the workers are doing.

Work comes from two places. incoming/ is watched for new files (router/daemon/spool_watch.py),
which go out at once. deferred/ is read once at start (file mtimes, the next attempt times) into
the dispatcher's schedule, which worker reports and inotify keep up to date, so a large deferred
queue costs no directory scans. Which message goes to which worker, and when, is the
dispatcher's decision (router/daemon/dispatcher.py): the supervisor hands it the workers' free
sessions, writes the tasks it returns and tells it what the workers report. What is done every
so often rather than per event is router/daemon/housekeeping.py's.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import selectors
import signal
import stat
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import psutil

from policy.next_hop import NextHop
from policy.routing import load_policy
from policy.transport_map import PolicyError
from router.config import Config, ConfigError, load, privileges
from router.daemon import reach, status_socket
from router.daemon.control import COMMANDS, Daemon, QueueCommands
from router.daemon.dispatcher import PROBE_SECONDS, Destination, Dispatcher, Limits, Routed, Suspension, Task
from router.daemon.drain import Drainer, DrainError
from router.daemon.housekeeping import Housekeeping
from router.daemon.spool_watch import SpoolWatch
from router.daemon.verifier import Verifier
from router.logs import target as log_module
from router.logs.lines import QMGR, Delays, delivery, logger
from router.spool import ACTIVE, DEFERRED, HOLD, INCOMING, Spool
from router.spool.durable import error_name
from router.spool.envelope import pending_recipients
from router.spool.lock import SpoolLock
from router.spool.queue_file import POISON_CRASHES
from router.spool.queue_id import arrival_of, is_queue_id
from workers.delivery import CORRUPTED, KEPT, QUEUED_AGAIN, SKIPPED, Report
from workers.pools import LOCAL, NETWORK, pool_for, pool_of
from workers.worker import Worker

if TYPE_CHECKING:
    from router.daemon.cluster import Cluster
    from router.daemon.cluster_view import Publisher
    from router.daemon.metrics import Metrics

log = logger(QMGR)

YOUNG_WORKER_SECONDS = 1.0
YOUNG_DEATHS = 5  # workers dying this young, in a row: the daemon stops instead of forking forever
BOOT_ERROR = 3  # a worker's exit status when it could not start at all (as gunicorn's workers)
TAKE_BACK_SECONDS = 3.0  # a worker silent this long gets no more mail, and what it has not begun is given to others
INITIAL_WINDOW = 5  # a destination's first window, unless the destinations file says otherwise
WATCHDOG_SECONDS = 15.0  # a worker silent this long is killed: its main thread says it is alive every second
TROUBLE_LOG_SECONDS = 60.0  # "spool full" is said at most this often
FILES_BESIDE_SESSIONS = 64  # a worker's files other than its connections: pipes, logs, spool files, DNS


class WorkerHandle:
    """The supervisor's view of one worker process."""

    def __init__(self, pid: int, task_fd: int, report_fd: int, pool: str, sessions: int):
        self.pid = pid
        self.pool = pool  # network or local (workers/pools.py)
        self.sessions = sessions  # how many messages it may have at once
        self.task_fd = task_fd
        self.report_fd = report_fd
        self.started = self.heard = time.monotonic()
        self.jobs: dict[str, tuple[str, float]] = {}  # queue id -> (its queue, when handed out), oldest first
        self.done = 0
        self.retiring = False
        self.silent = False  # has not answered for TAKE_BACK_SECONDS
        self.solo = False  # delivers a suspect message alone: it is given nothing else meanwhile
        self.draining = False  # given nothing new until it is idle, to deliver a suspect alone
        self.killed = False  # by the watchdog
        self.buffer = b""

    @property
    def job(self) -> tuple[str, str, float] | None:
        """(queue, queue id, since) of the oldest message handed out."""
        for queue_id, (queue, since) in self.jobs.items():
            return queue, queue_id, since
        return None

    def open(self) -> int:
        """How many more messages it may be given now."""
        if self.retiring or self.silent or self.solo or self.draining or self.task_fd < 0:
            return 0
        return max(0, self.sessions - len(self.jobs))

    def give(self, queue: str, queue_id: str, now: float) -> None:
        self.jobs[queue_id] = (queue, now)

    def finish(self, queue_id: str) -> None:
        self.jobs.pop(queue_id, None)

    def close_tasks(self) -> None:
        """Closing the task pipe tells the worker to exit after the deliveries in progress."""
        if self.task_fd >= 0:
            os.close(self.task_fd)
            self.task_fd = -1


class Supervisor:
    def __init__(self, config: Config, config_path: str | None = None, flags: Mapping[str, str] | None = None):
        self.config = config
        self.config_path = config_path
        self.flags = dict(flags or {})
        self.spool = Spool(config.queue_dir, config.spool_group)
        self.lock = SpoolLock(config.queue_dir)
        self.selector = selectors.DefaultSelector()
        self.dispatcher = Dispatcher(self._limits, min(config.min_backoff, PROBE_SECONDS), self._route)
        self.suspects: set[str] = set()  # in progress, with others, in a worker that died
        self.isolated: deque[tuple[str, str]] = deque()  # suspects waiting to be delivered alone
        self.workers: dict[int, WorkerHandle] = {}
        self.crashes: dict[str, int] = {}
        self.kept: dict[str, str] = {}  # queue id -> where a message waits that could not be filed away
        self.unsaved: dict[str, str] = {}  # queue id -> results its file does not record (Report.states)
        self.trouble_logged = -TROUBLE_LOG_SECONDS
        self.signals: list[int] = []
        self.counters = {"sent": 0, "deferred": 0, "bounced": 0}
        self.started = time.time()
        self.stopping = False
        self.stop_deadline = 0.0
        self.respawn_after = 0.0
        self.metrics: Metrics | None = None  # with metrics-listen
        self.publisher: Publisher | None = None  # with cluster-redis: this node's status for the cluster's view
        self.cluster: Cluster | None = None  # with cluster-redis
        self.after_attempt: dict[str, str] = {}  # queue id in hand -> hold or delete, once its attempt ends
        self.control = QueueCommands(self.spool, _Hooks(self))
        self.young_deaths = 0
        self.exit_code = 0

    # -- start and stop -------------------------------------------------------------------

    def run(self, on_ready: Callable[[str | None], None] = lambda error: None) -> int:
        """Run until stopped; `on_ready` hears None once serving, or why the start failed."""
        try:
            self._start()
        except Exception as exc:
            message = f"cannot start: {exc}"
            for problem in str(exc).splitlines():
                log.critical("cannot start: %s", problem)
            on_ready(message)
            return 1
        on_ready(None)
        while not (self.stopping and not self.workers):
            self._maintain_pool()
            self._dispatch()
            if self.cluster is not None:
                self.cluster.tick(time.time())
            for key, _ in self.selector.select(self._timeout()):
                key.data()
            self._handle_signals()
            self.verifier.tick(time.time())
            self._promote_due()
            self.housekeeping.tick(self.config)
            self._record_drain()
            self._watch_workers()
            self._check_stop_deadline()
        self._shutdown()
        return self.exit_code

    def _start(self) -> None:
        self._take_identity()
        self._open_files_for_sessions()
        self.drainer = Drainer(self.config.queue_dir)
        self.loaded_policy = load_policy(self.config, privileges.fixed_agent_user())
        self.policy = self.drainer.applied(self.loaded_policy)
        self._check_reach()
        os.makedirs(self.config.queue_dir, mode=0o700, exist_ok=True)
        self.lock.acquire()
        self.spool.create()
        self._recover_active()
        for name in self.spool.remove_stale_tmp(time.time()) + self.spool.remove_own_staging():
            log.warning("removed stale staging file tmp/%s", name)
        self._setup_signals()
        self.watch = SpoolWatch(self.spool, {INCOMING: self._incoming, DEFERRED: self._deferred}, self._scan)
        self.selector.register(self.watch.fileno(), selectors.EVENT_READ, self.watch.read)
        self._scan()
        if self.drainer.drain is not None:  # resumed: what waits for a retry goes to the peer now
            self._flush_deferred()
        self.status_server = status_socket.StatusServer(self.config.socket_path, self._answer, self.selector)
        if self.config.metrics_listen:  # the library only when asked for: it starts a thread
            from router.daemon.metrics import Metrics

            self.metrics = Metrics(self.config.metrics_listen, self.config.queue_dir,
                                   self.config.node if self.config.cluster_redis else "")
            self.metrics.start()
        if self.config.cluster_redis:  # the library only in a cluster; a thread, as the metrics'
            from router.daemon.cluster_view import Publisher

            self.publisher = Publisher(self.config.cluster_redis, self.config.node, self.config.queue_dir,
                                       self.config.cluster_status_interval)
            self.publisher.start()
        self._join_cluster()
        self.verifier = Verifier(self.status_server, self._ask_worker, self.dispatcher, self.config, self.metrics)
        self.housekeeping = Housekeeping(self.spool, self.dispatcher, self.status, self._ask_worker, self.metrics,
                                         self.publisher)
        for warning in self._config_warnings(self.config):
            log.warning(warning)
        self._maintain_pool()
        log.info("started: spool %s, %d workers, %d queued, %d deferred", self.config.queue_dir,
                 self.config.workers, len(self.dispatcher.fresh), len(self.dispatcher.schedule))

    def _join_cluster(self) -> None:
        """With cluster-redis: destination limits shared with the other nodes through Redis, which a
        thread of its own talks to (the library only when asked for)."""
        if not self.config.cluster_redis:
            return
        from router.daemon.cluster import Cluster

        self.cluster = Cluster(self.config.cluster_redis, self.config.node, self.dispatcher)
        self.dispatcher.shared = self.cluster
        self.selector.register(self.cluster.fds()[0], selectors.EVENT_READ, self._cluster_answered)

    def _cluster_answered(self) -> None:
        assert self.cluster is not None
        now = time.time()
        self._came_back(self.cluster.answered(now), now)

    def _take_identity(self) -> None:
        """Started as root: make the spool the unprivileged user's and become that user, keeping
        only the right to switch users, for local delivery (router/config/privileges.py). Started as a
        user, keep no more of that right than was given."""
        if os.geteuid() != 0:
            privileges.keep_only_switching()
            return
        entry = privileges.account(self.config.user)
        os.makedirs(self.config.queue_dir, mode=0o700, exist_ok=True)
        changed = 0
        if os.stat(self.config.queue_dir).st_uid != entry.pw_uid:  # new, or written by root: once
            changed = privileges.give_tree(self.config.queue_dir, entry)
        privileges.become(entry, self.config.spool_group)
        log.info("running as user %s (uid %d); the spool belongs to it%s", entry.pw_name, entry.pw_uid,
                 f" ({changed} files and directories given to it)" if changed else "")

    def _check_reach(self) -> None:
        """As the user it has become: a file it could not read again would fail the first
        reload, so it is refused now; a Maildir base it cannot write defers that mail, said now."""
        unreadable = reach.problems(reach.files_read(self.config, self.config_path), [])
        if unreadable:
            raise ConfigError("\n".join(unreadable))
        for problem in reach.problems([], reach.maildir_bases(self.policy)):
            log.warning(problem)

    def _open_files_for_sessions(self) -> None:
        """A worker holds a connection per session and as many kept idle (docs/architecture.md),
        more than the usual soft limit of 1024 open files with the default max-sessions: the soft
        limit goes up to the hard one, which the workers inherit. A hard limit too low is said."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = 2 * self.config.sessions_per_worker + FILES_BESIDE_SESSIONS
        if soft != resource.RLIM_INFINITY and soft < needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            if hard != resource.RLIM_INFINITY and hard < needed:
                log.warning("the open files limit (%d) is below the %d a worker may need with max-sessions %d; "
                            "raise it (LimitNOFILE= in the systemd unit) or lower max-sessions", hard, needed,
                            self.config.max_sessions)

    def _recover_active(self) -> None:
        """Files an earlier run left in active/ go back to incoming/ (before any worker runs);
        one that cannot be moved (a full disk) is delivered from where it is."""
        for name in self.spool.list(ACTIVE):
            if not is_queue_id(name):
                self._set_aside(name, ACTIVE)
                continue
            log.warning("%s: left in active/ by an earlier run, queued again", name)
            self._requeue_active(name)

    def _requeue_active(self, queue_id: str) -> None:
        """Put a message from active/ back into incoming/; if the disk refuses the move, deliver it
        from where it is."""
        if not self._move(queue_id, ACTIVE, INCOMING):
            self._enqueue_ready(ACTIVE, queue_id)

    def _setup_signals(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup = (read_fd, write_fd)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(signum, lambda signum, frame: self.signals.append(signum))
        self.selector.register(read_fd, selectors.EVENT_READ, self._on_wakeup)

    def _shutdown(self) -> None:
        self._record_drain(stopping=True)
        self.status_server.close()
        self.verifier.close()
        if self.cluster is not None:
            self.cluster.close()
        left = self.spool.list(ACTIVE)
        if left:
            log.warning("stopped with %d message(s) in active/; they are tried again at the next start", len(left))
        log.info("stopped")
        self.lock.release()

    def _begin_stop(self, signum: int) -> None:
        if self.stopping:
            return
        log.info("%s received: finishing deliveries in progress (at most %.0fs)",
                 signal.Signals(signum).name, self.config.shutdown_timeout)
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.config.shutdown_timeout
        for worker in self.workers.values():
            worker.close_tasks()

    def _check_stop_deadline(self) -> None:
        if self.stopping and self.workers and time.monotonic() >= self.stop_deadline:
            for worker in self.workers.values():
                log.warning("worker %d still busy with %s at the end of shutdown-timeout; killing it",
                            worker.pid, ", ".join(worker.jobs) or "nothing")
                _kill(worker.pid)
            self.stop_deadline = float("inf")

    # -- configuration --------------------------------------------------------------------

    def _reload(self) -> None:
        """SIGHUP: read the config again; if good, replace the workers (each finishes its
        message first), otherwise keep everything as it is."""
        try:
            config = load(self.config_path, self.flags)
            if config.queue_dir != self.config.queue_dir:
                raise ConfigError(f"queue-dir cannot change on reload ({self.config.queue_dir} -> {config.queue_dir})")
            policy = load_policy(config, privileges.fixed_agent_user())
        except (ConfigError, PolicyError) as exc:
            for problem in str(exc).splitlines():
                log.error("reload refused, keeping the running config and policy: %s", problem)
            return
        except Exception:  # a parser that let something through: a bug, but never the daemon's end
            log.exception("reload refused, keeping the running config and policy: unexpected error")
            return
        for warning in self._config_warnings(config):
            log.warning(warning)
        self.config, self.loaded_policy, self.policy = config, policy, self.drainer.applied(policy)
        self.verifier.reconfigure(config)
        self.dispatcher.reconfigure(min(config.min_backoff, PROBE_SECONDS))
        self.dispatcher.rerouted()
        self._retire_workers()
        log.info("reloaded %s: starting %d new workers", self.config_path or "flags", config.workers)
        if self.metrics:
            self.metrics.reloaded()

    def _retire_workers(self) -> None:
        """Replace every worker with one forked under the policy in force; each finishes what it
        has first."""
        for worker in self.workers.values():
            worker.retiring = True
            worker.close_tasks()

    def _drain(self, request: dict[str, Any], uid: int) -> dict[str, Any]:
        """`qrouter drain --to HOST[:PORT]` and `--cancel` (router/daemon/drain.py): mark the spool,
        route by the policy that follows (what the dispatcher holds too), and have every deferred
        message tried now. The answer says how many messages hold/ keeps here."""
        if uid not in (0, os.geteuid()):
            return {"error": "permission denied: only root and the daemon's user may drain the node"}
        try:
            if request.get("cancel"):
                drain = self.drainer.cancel()
            else:
                drain = self.drainer.begin(str(request.get("to", ""))[:1000], self.counters["sent"])
        except (DrainError, OSError) as exc:
            return {"error": str(exc)}
        policy = self.drainer.applied(self.loaded_policy)
        if policy is not self.policy:
            self.policy = policy
            self.dispatcher.rerouted()
            self._retire_workers()
            if self.drainer.drain is not None:
                self._flush_deferred()
        log.info("drain %s by uid %d", "cancelled" if request.get("cancel") else f"to {drain.to}", uid)
        return {"drain": self.drainer.status(self.counters["sent"]), "to": drain.to,
                "held": len(self.spool.ids(HOLD))}

    def _record_drain(self, stopping: bool = False) -> None:
        """The drain's count of recipients sent to the peer, into its mark now and then (and when
        stopping), so that a restart goes on counting."""
        try:
            self.drainer.record(self.counters["sent"], stopping=stopping)
        except OSError as exc:
            self._spool_trouble(error_name(exc), "cannot record the drain's progress in its mark")

    def _flush_deferred(self) -> None:
        """Every deferred message due now, as `qrouter queue flush` makes it."""
        flushed = self.control.run("flush", self.spool.list(DEFERRED))["done"]
        log.info("drain: %d deferred message(s) to be tried now", len(flushed))

    @staticmethod
    def _config_warnings(config: Config) -> list[str]:
        warnings = []
        if config.relayhost is not None and (config.transports or config.default_transport):
            warnings.append(f"relayhost {config.relayhost} takes precedence: every message goes there, "
                            "transports and default-transport are not used")
        return warnings

    # -- workers --------------------------------------------------------------------------

    def _maintain_pool(self) -> None:
        if self.stopping or time.monotonic() < self.respawn_after:
            return
        serving = Counter(w.pool for w in self.workers.values() if not w.retiring)
        for pool, (count, _) in self._pool_sizes().items():
            for _ in range(count - serving[pool]):
                self._spawn(pool)

    def _pool_sizes(self) -> dict[str, tuple[int, int]]:
        """pool -> (workers, sessions each): local workers only when the policy has pipes or
        local agents."""
        config = self.config
        local = config.local_workers if any(pool_of(kind) == LOCAL for kind in self.policy.kinds) else 0
        return {NETWORK: (config.workers, config.sessions_per_worker),
                LOCAL: (local, max(1, -(-config.local_sessions // config.local_workers)))}

    def _spawn(self, pool: str) -> None:
        sessions = self._pool_sizes()[pool][1]
        task_read, task_write = os.pipe()
        report_read, report_write = os.pipe()
        supervisor_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._be_worker(task_read, report_write, (task_write, report_read), pool, sessions, supervisor_pid)
        os.close(task_read)
        os.close(report_write)
        os.set_blocking(report_read, False)
        worker = WorkerHandle(pid, task_write, report_read, pool, sessions)
        self.workers[pid] = worker
        self.selector.register(report_read, selectors.EVENT_READ, lambda: self._on_report(worker))

    def _be_worker(self, task_fd: int, report_fd: int, supervisor_fds: tuple[int, int], pool: str, sessions: int,
                   supervisor_pid: int) -> NoReturn:
        """In the new child: become a worker, serve until told to stop, and end there."""
        try:
            self._become_worker(*supervisor_fds)
            worker = Worker(task_fd, report_fd, self.config, self.policy, pool, sessions)
            worker.start(supervisor_pid)
        except BaseException:
            log.exception("worker %d cannot start", os.getpid())
            os._exit(BOOT_ERROR)
        status = 0
        try:
            worker.serve()
        except BaseException:
            log.exception("worker %d crashed", os.getpid())
            status = 70
        finally:
            os._exit(status)

    def _become_worker(self, *own_fds: int) -> None:
        """In the new child: let go of everything that belongs to the supervisor."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        fds = [*own_fds, *self.wakeup, self.watch.fileno(), *self.status_server.fds(), *self.verifier.fds(),
               *(self.cluster.fds() if self.cluster else ())]
        for other in self.workers.values():
            fds += [other.task_fd, other.report_fd]
        self.selector.close()
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._worker_exited(worker, status)

    def _worker_exited(self, worker: WorkerHandle, status: int) -> None:
        self._on_report(worker, drain=True)  # a report written just before dying still counts
        self.selector.unregister(worker.report_fd)
        os.close(worker.report_fd)
        worker.close_tasks()
        self.verifier.worker_gone(worker.pid)
        how = _describe_exit(status)
        lost = [(queue, queue_id) for queue_id, (queue, _) in worker.jobs.items()]
        worker.jobs.clear()
        claimed = [queue_id for _, queue_id in lost if os.path.exists(self.spool.path(ACTIVE, queue_id))]
        if len(claimed) > 1 and not worker.killed:
            self.suspects.update(claimed)  # which one killed it is not known: each goes again alone
        for _, queue_id in lost:
            if self.dispatcher.in_flight(queue_id) == worker.pid:
                self.dispatcher.given_back(queue_id)
        self.dispatcher.worker_gone(worker.pid)
        for queue_id in claimed:  # being delivered; the others were still waiting in the pipe
            log.error("worker %d %s while delivering %s", worker.pid, how, queue_id)
        if not claimed and (not (worker.retiring or self.stopping) or status != 0):
            log.error("worker %d %s", worker.pid, how)
        blame = not worker.killed and len(claimed) <= 1  # see _dispatch_isolated
        for queue, queue_id in lost:
            self._job_lost(queue, queue_id, blame)
        for name in self.spool.remove_own_staging(queue_id for _, queue_id in lost):
            log.warning("removed tmp/%s, a rewrite the worker did not finish", name)
        self._judge_start(worker, status, delivering=bool(lost))

    def _judge_start(self, worker: WorkerHandle, status: int, delivering: bool) -> None:
        """A worker that could not start, or workers that keep dying as soon as they start, stop
        the daemon with the reason, rather than being forked again every second forever. A worker
        that died delivering is the poison count's business (a message, not the daemon, is at
        fault), so such a death is no sign that workers cannot start; it is still forked again
        a second later, not at once."""
        if worker.retiring or self.stopping:
            return
        young = time.monotonic() - worker.started < YOUNG_WORKER_SECONDS
        self.young_deaths = self.young_deaths + 1 if young and not delivering else 0
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == BOOT_ERROR:
            log.critical("a worker cannot start (the reason is logged above); stopping")
        elif self.young_deaths >= YOUNG_DEATHS:
            log.critical("%d workers in a row died within %.0fs of starting; stopping", self.young_deaths,
                         YOUNG_WORKER_SECONDS)
        else:
            if young:
                self.respawn_after = time.monotonic() + YOUNG_WORKER_SECONDS
            return
        self.exit_code = 1
        self._begin_stop(signal.SIGTERM)

    def _job_lost(self, queue: str, queue_id: str, blame: bool) -> None:
        """A worker died holding a message: try it again, unless it keeps killing workers.
        Without `blame` (the watchdog killed the worker, or it died with others in progress) the
        death is not counted against the message.

        The death is counted in the message's file (`@* crash`), where the count survives a
        restart and the worker that claims the message next enforces it (POISON_CRASHES: hold/).
        The count in memory holds it back within this run even if the file cannot take the record."""
        if not os.path.exists(self.spool.path(ACTIVE, queue_id)):
            self._enqueue_ready(queue, queue_id)  # never claimed: still where it was
            return
        if self.stopping:
            return  # left in active/ for the next start
        if not blame:
            self._requeue_active(queue_id)
            return
        try:
            self.spool.record_crash(queue_id)
        except OSError as exc:  # a full disk: never the supervisor's death
            log.error("%s: cannot count the worker's death in its queue file (%s); counted until the next start only",
                      queue_id, exc.strerror or exc)
        crashes = self.crashes[queue_id] = self.crashes.get(queue_id, 0) + 1
        if crashes < POISON_CRASHES:
            self._requeue_active(queue_id)
            return
        try:
            self.spool.hold_poison(queue_id)  # its count starts again, should it be released
            held = True
        except OSError:
            held = self._move(queue_id, ACTIVE, HOLD)
        if held:
            self.crashes.pop(queue_id)
            self.unsaved.pop(queue_id, None)
            log.error("%s: poison message: it killed %d workers; moved to hold/", queue_id, crashes)
        else:
            log.error("%s: poison message: it killed %d workers; left in active/ until the next start",
                      queue_id, crashes)

    # -- work -----------------------------------------------------------------------------

    def _scan(self) -> None:
        for name in sorted(self.spool.list(INCOMING)):
            self._incoming(name)
        for entry in os.scandir(self.spool.path(DEFERRED)):
            self._deferred(entry.name)

    def _incoming(self, name: str) -> None:
        if name.startswith("."):  # hidden: an editor's or a copying tool's own file
            return
        if not is_queue_id(name):
            self._set_aside(name, INCOMING)
            return
        self._enqueue_ready(INCOMING, name)

    def _deferred(self, name: str) -> None:
        """Schedule a deferred message by its mtime. Anything that cannot be a deferred queue
        file goes to corrupt/ at once, so it is not retried (and logged) forever; a regular
        file that turns out unreadable goes there from the worker that tries it."""
        if name.startswith("."):
            return
        if not is_queue_id(name):
            self._set_aside(name, DEFERRED)
            return
        try:
            info = os.lstat(self.spool.path(DEFERRED, name))
        except FileNotFoundError:
            return
        if stat.S_ISREG(info.st_mode):
            if not self.dispatcher.holds(name):  # one it holds is scheduled by its report, not its mtime
                self.dispatcher.schedule.add(name, info.st_mtime)
        else:
            self._set_aside(name, DEFERRED, "not a regular file")

    def _set_aside(self, name: str, queue: str, why: str = "not a queue id") -> None:
        try:
            target = self.spool.set_aside(name, queue)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s/%s: %s; cannot move it to corrupt/: %s", queue, name, why, exc.strerror or exc)
            return
        log.error("%s/%s: %s; moved to corrupt/%s", queue, name, why, target)
        if self.metrics:
            self.metrics.corrupt()

    def _move(self, queue_id: str, source: str, target: str, *, mtime: float | None = None) -> bool:
        """Move a message between queues; False, with the reason logged, if the disk refuses
        (full, failing): the supervisor never dies of its spool."""
        try:
            return self.spool.move(queue_id, source, target, mtime=mtime)
        except OSError as exc:
            self._spool_trouble(error_name(exc), f"cannot move {source}/{queue_id} to {target}/")
            return False

    def _spool_trouble(self, error: str, what: str) -> None:
        """Say that the spool cannot store state, once a minute however many messages it hits."""
        now = time.monotonic()
        if now < self.trouble_logged + TROUBLE_LOG_SECONDS:
            return
        self.trouble_logged = now
        full = error in ("ENOSPC", "EDQUOT")
        reason = os.strerror(getattr(errno, error, errno.EIO))
        log.error("%s %s (%s): %s; %d message(s) wait where they are and are retried, nothing is lost",
                  "spool full:" if full else "spool write error:", self.config.queue_dir, reason, what,
                  len(self.kept))

    def _enqueue_ready(self, queue: str, queue_id: str, *, retry: bool = False) -> None:
        if queue_id in self.suspects:
            if not self._in_hand(queue_id) and (queue, queue_id) not in self.isolated:
                self.isolated.append((queue, queue_id))
        else:
            self.dispatcher.ready(queue, queue_id, retry=retry)

    def _in_hand(self, queue_id: str) -> bool:
        return any(queue_id in worker.jobs for worker in self.workers.values())

    def _promote_due(self) -> None:
        self.dispatcher.promote_due(time.time(), lambda queue_id: self.kept.pop(queue_id, DEFERRED))

    def _dispatch(self) -> None:
        """Hand out what the dispatcher says can go, one write per worker; defer the messages
        whose destinations are all dead; tell workers to drop idle connections the dispatcher
        needs room for."""
        if self.stopping:
            return
        if self.isolated:
            self._dispatch_isolated()
        free = {w.pid: (w.pool, n) for w in self.workers.values() if (n := w.open())}
        now = time.time()
        tasks, suspensions = self.dispatcher.dispatch(free, now)
        for suspension in suspensions:
            self._suspend(suspension)
        given: dict[WorkerHandle, list[Task]] = {}
        for pid, task in tasks:
            worker = self.workers[pid]
            worker.give(task.queue, task.queue_id, now)
            given.setdefault(worker, []).append(task)
        for worker, handed in given.items():
            try:
                os.write(worker.task_fd, b"".join(self._task_line(task) for task in handed))
            except OSError:  # that worker is dying; reaping will replace it
                for task in handed:
                    worker.jobs.pop(task.queue_id)
                    if self.dispatcher.given_back(task.queue_id):
                        self.dispatcher.ready(task.queue, task.queue_id)
        self._ask_sites(now)
        for pid, names in self.dispatcher.take_drops().items():
            holder = self.workers.get(pid)
            if holder is not None and holder.task_fd >= 0:
                try:
                    os.write(holder.task_fd, json.dumps({"drop": sorted(names)}).encode() + b"\n")
                except OSError:
                    pass  # dying: its connections go with it

    def _ask_sites(self, now: float) -> None:
        """Have a network worker look up the sites of MX domains the dispatcher needs (MX rollup);
        one asked of no worker, or of one that dies, is asked again later."""
        entries = self.dispatcher.take_lookups(now)
        if entries:
            self.dispatcher.asked_of(self._ask_worker({"lookup": entries}), entries, now)

    def _ask_worker(self, record: dict[str, Any]) -> int:
        """Hand a question (the sites of MX domains; for recipient verification, a domain for DNS
        or a callout) to a network worker, the one with the fewest messages in hand; its pid, or 0
        when none can be asked."""
        serving = [w for w in self.workers.values()
                   if w.pool == NETWORK and w.task_fd >= 0 and not (w.retiring or w.silent)]
        for worker in sorted(serving, key=lambda w: len(w.jobs)):
            try:
                os.write(worker.task_fd, json.dumps(record).encode() + b"\n")
            except OSError:  # that worker is dying: the next one
                continue
            return worker.pid
        return 0

    def _dispatch_isolated(self) -> None:
        """A worker that dies with several messages in progress gives no clue which one killed
        it, so none is blamed: each goes again alone, to a worker given nothing else until it
        reports. One that kills that worker too is blamed (a poison message after three);
        the others are delivered as usual."""
        while self.isolated:
            queue, queue_id = self.isolated[0]
            routed = self._route(queue, queue_id)
            pool = routed.pool if routed else NETWORK
            kind = [w for w in self.workers.values() if w.pool == pool and w.task_fd >= 0]
            idle = [w for w in kind if not (w.jobs or w.retiring or w.silent or w.solo)]
            if not idle:
                if not any(w.draining for w in kind):
                    busy = [w for w in kind if not (w.retiring or w.silent)]
                    if busy:
                        min(busy, key=lambda w: len(w.jobs)).draining = True
                return
            worker = next((w for w in idle if w.draining), idle[0])
            self.isolated.popleft()
            worker.draining, worker.solo = False, True
            worker.give(queue, queue_id, time.time())
            try:
                os.write(worker.task_fd, self._task_line(Task(queue, queue_id, go=None)))
            except OSError:  # that worker is dying; reaping will replace it and give it back
                pass

    def _route(self, queue: str, queue_id: str) -> Routed | None:
        """The destinations of a message's pending recipients by the policy in force, the kind of
        worker it needs, and when a worker must see it whatever its destinations' state (expiry,
        delay warning); no destinations if its file cannot be read this way; None if it is gone.
        A policy with one next hop for everyone (a relayhost) needs no file read, unless delay
        warnings need to know whether one went already."""
        config = self.config
        arrival = arrival_of(queue_id)
        expires = arrival + config.max_age * 86400
        only = self.policy.only_next_hop
        if only is not None and not config.delay_warning:
            return Routed((only.destination,), pool_for([only]), expires)
        path = self.spool.path(queue, queue_id)
        envelope = pending_recipients(path)
        if envelope is None:
            return None if not os.path.lexists(path) else Routed((), NETWORK)
        addresses, rewritten, warned = envelope
        warn = arrival + config.delay_warning * 3600 if config.delay_warning and not warned else expires
        hops: dict[NextHop, None] = {}
        for address in addresses:
            try:
                hops[only or self.policy.route_queued(address, rewritten).next_hop] = None
            except Exception:  # the worker routes it again and says what is wrong
                continue
        pool = pool_for(hops)
        names = (hop.destination for hop in hops if pool_of(hop.kind) == pool)  # the others are split off
        return Routed(tuple(dict.fromkeys(names)), pool, min(expires, warn))

    def _limits(self, name: str) -> Limits:
        """A destination's concurrency limit, first window and rate: its rule in the destinations
        file, destination-concurrency for what the rule leaves out."""
        settings = self.policy.destinations.for_destination(name)
        limit = settings.concurrency or self.config.destination_concurrency
        return Limits(limit, min(settings.initial_window or INITIAL_WINDOW, limit), settings.rate, settings.mx_rollup)

    def _suspend(self, suspension: Suspension) -> None:
        """Defer a message whose destinations are all dead without trying it, until its probe
        time. If the spool cannot take the move now, the message waits where it is, due at the
        same time."""
        queue, queue_id = suspension.queue, suspension.queue_id
        if not self._move(queue_id, queue, DEFERRED, mtime=suspension.due):
            self.kept[queue_id] = queue
        self.dispatcher.schedule.add(queue_id, suspension.due)
        delays = Delays.measure(arrival_of(queue_id), taken=0.0)
        envelope = pending_recipients(self.spool.path(DEFERRED if queue_id not in self.kept else queue, queue_id))
        first = next(iter(suspension.why.values()))[0]
        for address in envelope.addresses if envelope else ["?"]:
            try:
                entry = self.policy.route_queued(address, envelope.rewritten).next_hop.destination if envelope else ""
            except Exception:  # as in _route: the worker says what is wrong when it tries it
                entry = ""
            why = suspension.why.get(entry, (first, 0.0))[0]
            delivery(QMGR, queue_id, address, relay="none", delays=delays, dsn="4.4.1", status="deferred", reply=why)

    def _finished(self, queue_id: str, reach: dict[str, str]) -> None:
        """A message's entries in flight are done: the dispatcher learns from what they found."""
        now = time.time()
        revived, died = self.dispatcher.finished(queue_id, reach, now)
        for destination in died:
            log.warning("destination %s is not reachable (%s); its mail waits without new attempts until a "
                        "probe in %.0fs", destination.label, destination.last_error,
                        destination.dead_until - now)
        self._came_back(revived, now)

    def _came_back(self, revived: list[Destination], now: float) -> None:
        """Destinations a probe reached (here, or on another node of the cluster): their mail is retried."""
        for destination in revived:
            count = self.dispatcher.recover(destination, now)
            log.info("destination %s answers again; retrying the %d message(s) deferred for it",
                     destination.label, count)

    def _task_line(self, task: Task) -> bytes:
        """The record that hands a message to a worker, with the results an earlier attempt
        could not store, if any."""
        record = task.record()
        if states := self.unsaved.get(task.queue_id):
            record["states"] = states
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"

    def _watch_workers(self) -> None:
        """A worker that stops saying it is alive (frozen, wedged) gets no more mail; what it
        has not begun goes to the others; and if it stays silent it is killed and replaced, and
        the messages it was delivering go back to the queue (as gunicorn's arbiter does)."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            silent = now - worker.heard
            if silent >= WATCHDOG_SECONDS and not worker.killed:
                log.error("worker %d has not answered for %.0fs; killing it", worker.pid, silent)
                worker.killed = True
                _kill(worker.pid)
            elif silent >= TAKE_BACK_SECONDS and not worker.silent:
                worker.silent = True
                self._take_back(worker, silent)

    def _take_back(self, worker: WorkerHandle, silent: float) -> None:
        """Give the messages a silent worker has not claimed (still in their queue) to others.
        Should it wake up and claim one after all, the rename lets only one worker have it."""
        unclaimed = [(queue, queue_id) for queue_id, (queue, _) in worker.jobs.items()
                     if queue != ACTIVE and os.path.lexists(self.spool.path(queue, queue_id))]
        for queue, queue_id in unclaimed:
            worker.jobs.pop(queue_id)
            self.dispatcher.given_back(queue_id)
            self._enqueue_ready(queue, queue_id)
        log.warning("worker %d has not answered for %.0fs; %d message(s) it had not begun given to others",
                    worker.pid, silent, len(unclaimed))

    def _timeout(self) -> float | None:
        if self.dispatcher.more_ready:
            return 0.0
        deadlines = [TAKE_BACK_SECONDS] if self.workers else []
        due = self.dispatcher.next_wakeup(time.time())
        if due is not None:
            deadlines.append(due)
        if self.respawn_after > time.monotonic():
            deadlines.append(self.respawn_after - time.monotonic())
        if self.stopping and self.workers:
            deadlines.append(self.stop_deadline - time.monotonic())
        status_due = self.status_server.expire()  # status socket: closes late clients, says when the next is due
        if status_due is not None:
            deadlines.append(status_due)
        verify_due = self.verifier.next_due(time.time())  # a verify client to answer, a probe to start
        if verify_due is not None:
            deadlines.append(verify_due)
        cluster_due = self.cluster.next_due(time.time()) if self.cluster else None  # a request to Redis
        if cluster_due is not None:
            deadlines.append(cluster_due)
        return max(0.0, min(deadlines)) if deadlines else None

    # -- event handlers -------------------------------------------------------------------

    def _on_wakeup(self) -> None:
        try:
            while os.read(self.wakeup[0], 512):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGCHLD:
                self._reap()
            elif signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGUSR1:
                log_module.reopen()  # logrotate moved the file log; workers reopen by themselves
            else:
                self._begin_stop(signum)

    def _on_report(self, worker: WorkerHandle, drain: bool = False) -> None:
        """Read what the worker reported: report lines, and empty lines that only say it is
        alive. One read when the pipe is readable (whatever is left makes the selector call
        again); `drain` reads to the end, for a worker that has exited."""
        try:
            while chunk := os.read(worker.report_fd, 65536):
                worker.buffer += chunk
                if not drain:
                    break
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
        worker.heard = time.monotonic()
        worker.silent = False
        *lines, worker.buffer = worker.buffer.split(b"\n")
        for line in lines:
            if not line:
                continue
            record = json.loads(line)
            if "kept" in record:  # idle connections, before what the report frees
                self.dispatcher.kept(worker.pid, record["kept"], record.get("read", 0))
            if "queue_id" in record:
                self._report(worker, Report.from_record(record))
            for entry, site in record.get("sites", {}).items():  # the sites of MX domains, as asked
                self.dispatcher.site_found(entry, site, time.time())
            for domain, failure in record.get("domains", {}).items():  # recipient verification, as asked
                self.verifier.dns_answered(domain, failure)
            for key, answer in record.get("callouts", {}).items():
                self.verifier.callout_answered(key, answer)
            if self.metrics:
                for level, outcome, count in record.get("tls", ()):  # sessions opened, for the metrics
                    self.metrics.tls_sessions(level, outcome, count)

    def _report(self, worker: WorkerHandle, report: Report) -> None:
        queue_id = report.queue_id
        worker.finish(queue_id)
        worker.done += 1
        if worker.solo and not worker.jobs:
            worker.solo = False
            self.suspects.discard(queue_id)
        if self.dispatcher.in_flight(queue_id) == worker.pid:
            self._finished(queue_id, report.reach)
        elif report.result == SKIPPED:
            return  # a message taken back from this worker, now another's
        if report.result not in (SKIPPED, CORRUPTED):
            self.crashes.pop(queue_id, None)
        self.counters["sent"] += report.sent
        self.counters["deferred"] += report.deferred
        self.counters["bounced"] += report.bounced
        if self.metrics:
            self.metrics.delivered(report.sent, report.deferred, report.bounced, time.time() - arrival_of(queue_id))
            if report.result == CORRUPTED:
                self.metrics.corrupt()
        if report.result == KEPT:
            self.kept[queue_id] = report.queue
            if report.states:
                self.unsaved[queue_id] = report.states
        else:
            self.unsaved.pop(queue_id, None)
        if report.error:
            self._spool_trouble(report.error, f"cannot store the state of {queue_id}")
        if report.result in (QUEUED_AGAIN, KEPT):
            due = self.dispatcher.filed(queue_id, report.queue if report.result == KEPT else DEFERRED,
                                        report.next_attempt)
            if due is not None:
                self.dispatcher.schedule.add(queue_id, due)
        else:
            self.dispatcher.forget(queue_id)
        command = self.after_attempt.pop(queue_id, None)
        if command and report.result == QUEUED_AGAIN:  # asked for while it was being delivered
            for queue_id_done, what in self.control.run(command, [queue_id])["done"].items():
                log.info("%s: %s after its attempt", queue_id_done, what)

    def _answer(self, request: dict[str, Any], uid: int) -> dict[str, Any] | status_socket.Later:
        """A status socket request: `status` and `verify` (router/daemon/verifier.py) for anyone who may
        connect; the queue commands (router/daemon/control.py) only for root and the daemon's own user."""
        command = request.get("command", "status")
        if command == "status":
            answer = self.status()
            if isinstance(request.get("sites"), list):  # queue why: which sites these MX destinations are in
                answer["sites"] = self.dispatcher.sites_of(str(entry) for entry in request["sites"])
            return answer
        if command == "verify":
            return self.verifier.answer(request, self.policy)
        if command == "drain":
            return self._drain(request, uid)
        if command not in COMMANDS:
            return {"error": f"unknown command {command!r} (known: status, verify, drain, {', '.join(COMMANDS)})"}
        if uid not in (0, os.geteuid()):
            return {"error": f"permission denied: only root and the daemon's user may {command} messages"}
        ids = request.get("ids")
        if not isinstance(ids, list):
            return {"error": "bad request: 'ids' must be a list of queue ids"}
        answer = self.control.run(command, ids)
        if command == "flush":  # one line, as postqueue -f: a flush of thousands is not thousands of events
            log.info("flush of %d message(s) asked by uid %d", len(answer["done"]), uid)
        else:
            for queue_id, what in answer["done"].items():
                log.info("%s: %s (%s by uid %d)", queue_id, what, command, uid)
        return answer

    def status(self) -> dict[str, Any]:
        workers = []
        now = time.time()
        for worker in self.workers.values():
            job = worker.job
            entry: dict[str, Any] = {
                "pid": worker.pid,
                "pool": worker.pool,
                "state": "retiring" if worker.retiring else ("silent" if worker.silent else
                                                             ("busy" if job else "idle")),
                "sessions": len(worker.jobs),
                "queue_id": job[1] if job else None,
                "busy_for": round(now - job[2], 3) if job else None,
                "done": worker.done,
            }
            try:
                process = psutil.Process(worker.pid)
                cpu = process.cpu_times()
                entry.update(rss=process.memory_info().rss, cpu=round(cpu.user + cpu.system, 2))
            except psutil.Error:
                entry.update(rss=None, cpu=None)
            workers.append(entry)
        return {
            "pid": os.getpid(),
            "now": now,
            "queue_dir": self.config.queue_dir,
            "log": log_module.where(),
            "uptime": round(now - self.started, 3),
            "rss": psutil.Process().memory_info().rss,
            "scheduled": len(self.dispatcher.schedule),
            "sessions": sum(len(worker.jobs) for worker in self.workers.values()),
            "max_sessions": sum(w.sessions for w in self.workers.values() if not w.retiring),
            "workers": workers,
            "destinations": self.dispatcher.status(),
            "counters": dict(self.counters),
            "verify": self.verifier.status(),
            "drain": self.drainer.status(self.counters["sent"]),
            "cluster": self.cluster.status() if self.cluster else None,
        }


class _Hooks(Daemon):
    """What the queue commands tell the supervisor (router/daemon/control.py)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def in_hand(self, queue_id: str) -> bool:
        return self.supervisor._in_hand(queue_id)

    def after_attempt(self, queue_id: str, command: str) -> None:
        self.supervisor.after_attempt[queue_id] = command

    def scheduled(self, queue_id: str, due: float) -> None:
        self.supervisor.dispatcher.schedule.add(queue_id, due)

    def unscheduled(self, queue_id: str) -> None:
        self.supervisor.dispatcher.forget(queue_id)


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)} ({signal.Signals(os.WTERMSIG(status)).name})"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
