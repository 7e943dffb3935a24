"""SMTP and LMTP delivery: relay hosts (round robin, failover), DNS MX routing, kept connections.

For each next hop the transport works out the servers to try, best first, and walks down the list:
a server that cannot be reached or answers a recipient with 4xx hands that recipient to the next
server; 2xx and 5xx are final. Connections stay open for the next message to the same server
(RSET between) until `smtp-idle-timeout` passes, so a stream of mail to one hop costs one TCP and
TLS handshake, not one per message. The worker's session threads share one transport: a thread
takes a kept connection out of the pool for its message and puts it back after, so a connection
serves one message at a time and every message to that server in the worker.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from policy.destinations import DestinationRules, DestinationSettings
from policy.mta_sts import Applied
from policy.mta_sts import applies as sts_applies
from policy.next_hop import LMTP, MX, SMTP, NextHop, parse_hosts
from policy.tls_policy import DANE_LEVELS, TLS_NONE, TLSPolicy, names_to_match
from router.config import DNS_DNSSEC, Config
from router.config.dns_servers import ResolverConfigError
from router.logs.lines import logger, service_of
from router.spool.queue_file import QueueFile, Recipient
from workers.mx_hosts import MXHost, MXLookupError, address_literal, site_destination
from workers.smtp_client import LMTP_PORT, SMTP_PORT, SMTPClient, SMTPError, TLSFailure, TLSFallback, refused
from workers.tls_outcomes import Recorder
from workers.transport import BOUNCED, DEFERRED, Outcome

if TYPE_CHECKING:
    import dns.resolver

# Idle connections closed together wait this long in all for the replies to their QUITs: less than
# the supervisor's TAKE_BACK_SECONDS, since the worker's main thread closes them.
CLOSE_SECONDS = 2.0


@dataclass(frozen=True)
class Server:
    """One place to deliver to: a host name with one of its addresses, or a Unix socket."""

    name: str
    ip: str = ""
    port: int = SMTP_PORT
    lmtp: bool = False
    socket_path: str = ""
    auth: tuple[str, str] | None = None
    tls: TLSPolicy = TLSPolicy()  # its names resolved (names_to_match): a kept connection serves only its equal
    # The domain whose TLS report a new session to it counts in (MX routing's; "" for a relay host), not
    # part of what it is: a kept connection serves the other domains of its MX host as well
    report_domain: str = field(default="", compare=False)
    sts: Applied | None = None  # the MTA-STS policy it is used under (workers/mta_sts.py)
    secure: bool = False  # found by DNSSEC-validated answers (MXHost.secure), which DANE needs
    alias: str = ""  # where its name's validated CNAME chain ends (MXHost.alias), whose TLSA records count first

    @property
    def peer(self) -> str:
        return f"unix[{self.socket_path}]" if self.socket_path else f"{self.name}[{self.ip}]:{self.port}"


class SMTPTransport:
    def __init__(self, config: Config, rules: DestinationRules | None = None,
                 resolver: dns.resolver.Resolver | None = None):
        self.config = config
        self.rules = rules or DestinationRules()  # recipients per transaction, messages per connection
        self.helo_name = config.hostname
        self.credentials = config.relay_auth or {}
        self.kept: dict[Server, list[tuple[SMTPClient, float]]] = {}  # idle connections, last used last
        # Idle connections: as many as the worker has sessions, the allowance above max-sessions
        # (docs/architecture.md). A destination's, in use and idle in every worker, are bounded
        # by the dispatcher, which learns how many each worker keeps (kept_counts).
        self.max_kept = config.sessions_per_worker
        self.destination_of: dict[Server, str] = {}  # what its connections count against: next hop or site
        self.counted_as: dict[str, str] = {}  # next hop (NextHop.destination) -> its destination or site
        self.reserved: Counter[str] = Counter()  # idle connections promised to tasks read and not begun
        self.read = 0  # the number of the last task the worker read (router/daemon/dispatcher.py Task.number)
        self.promises = threading.local()  # .names: what the dispatcher promised this thread's delivery
        self._lock = threading.Lock()
        self.turn: dict[str, int] = {}
        self._resolver = resolver  # made on first use (_dns) unless given: `qrouter route` shares its own
        self._sts = None  # workers.mta_sts.Policies, made at the first MX delivery that may have one
        self._fixed: dict[tuple[str, int | None, bool], list[Server]] = {}  # see _relay_servers
        self.without_bdat: set[Server] = set()  # they offer CHUNKING but failed BDAT: DATA for them
        self.tls_sessions: Counter[tuple[str, str]] = Counter()  # (level, outcome) since take_tls_sessions
        self.tls_outcomes = Recorder(config.queue_dir, config.tls_report, config.spool_group)  # TLS reports

    # -- the Transport interface ----------------------------------------------------------

    def deliver(self, message: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        self.close_idle()
        started = time.monotonic()  # what comes before a server takes the message is set-up (Outcome.setup)
        try:
            hosts, servers = self._hosts_and_servers(hop)
        except (MXLookupError, ResolverConfigError) as exc:
            dsn, text = _lookup_failure(exc, hop.kind == MX)
            return Outcome.same_for(recipients, BOUNCED if dsn.startswith("5") else DEFERRED, dsn, text, "none",
                                    setup=time.monotonic() - started)
        outcomes: list[Outcome | None] = [None] * len(recipients)
        todo = list(range(len(recipients)))
        counted = self._site(hop, hosts) or hop.destination
        settings = self.rules.for_destination(counted)  # a site's, for a domain MX rollup puts in one
        with self._lock:
            self.counted_as[hop.destination] = counted
        for server in servers:
            with self._lock:
                self.destination_of[server] = counted
            todo = self._deliver_to(server, message, recipients, todo, outcomes, settings, started)
            if not todo:
                break
        return [outcome or Outcome(DEFERRED, "4.4.1", f"no server to try for {hop}", "none",
                                   setup=time.monotonic() - started) for outcome in outcomes]

    def close_idle(self) -> set[str]:
        """Close connections idle for smtp-idle-timeout; the destinations they were to."""
        limit = time.monotonic() - self.config.smtp_idle_timeout
        return self._close_kept(lambda server, last_used: last_used <= limit)

    def drop(self, destinations: set[str]) -> None:
        """Close the idle connections to these destinations (the dispatcher needs their room), but
        not those promised to tasks read and not begun: the dispatcher counts those in flight, and a
        task that found its connection gone would open another while the server still sees it."""
        self._close_kept(lambda server, last_used: self.destination_of.get(server) in destinations, drop=True)

    def _close_kept(self, stale: Callable[[Server, float], bool], drop: bool = False) -> set[str]:
        """Close the idle connections `stale` picks; to `drop`, leaving as many of each
        destination's as are promised to tasks read and not begun (see `drop`). The worker's main
        thread does this, while the reports of its sessions wait (a drop): the QUITs together
        wait at most CLOSE_SECONDS for their replies, and those not answered by then are closed
        without one, so a server slow to answer QUIT (a tarpit) holds up no one."""
        closing: list[tuple[SMTPClient, str]] = []
        with self._lock:
            spared = Counter(self.reserved) if drop else Counter()
            for server, clients in list(self.kept.items()):
                name = self.destination_of.get(server, "")
                gone = [client for client, last_used in clients if stale(server, last_used)]
                keep = min(len(gone), spared[name])
                spared[name] -= keep
                gone = gone[:len(gone) - keep]  # the last used are spared: a session takes those first
                if gone:
                    closing += [(client, name) for client in gone]
                    clients[:] = [(client, last_used) for client, last_used in clients if client not in gone]
                if not clients:
                    del self.kept[server]
        deadline = time.monotonic() + CLOSE_SECONDS
        for client, _ in closing:  # QUIT outside the lock: it waits for the server, for a while
            client.close(max(0.0, deadline - time.monotonic()))
        return {name for _, name in closing}

    def kept_counts(self, destinations: Iterable[str]) -> tuple[dict[str, int], int]:
        """How many idle connections this worker keeps to each of these destinations (a next
        hop's are counted as its site's, when MX rollup puts it in one), less those promised to
        tasks read and not begun; and the number of the last task read, counted at the same moment."""
        with self._lock:
            counts = dict.fromkeys((self.counted_as.get(name, name) for name in destinations), 0)
            for server, clients in self.kept.items():
                name = self.destination_of.get(server)
                if name in counts:
                    counts[name] += len(clients)
            return {name: max(0, count - self.reserved[name]) for name, count in counts.items()}, self.read

    def read_task(self, number: int, reuse: Iterable[str]) -> None:
        """The worker read task `number`, promised an idle connection at these destinations."""
        with self._lock:
            self.read = number
            self.reserved.update(reuse)

    def begin(self, reuse: Iterable[str]) -> None:
        """A session thread begins a task: the promises it carries are this thread's to take."""
        self.promises.names = set(reuse)

    def end(self) -> None:
        """The thread's task is over: promises it did not take (routed elsewhere, no attempt) lapse."""
        with self._lock:
            for name in list(self.promises.names):
                self._take_promise(name)

    def _take_promise(self, name: str) -> None:
        """The thread's promise of a connection to `name` is spent, taken or lapsed (the lock held):
        that idle connection is no longer reserved for it."""
        names = getattr(self.promises, "names", set())
        if name in names:
            names.discard(name)
            self.reserved[name] = max(0, self.reserved[name] - 1)

    def close(self) -> None:
        with self._lock:
            clients = [client for kept in self.kept.values() for client, _ in kept]
            self.kept.clear()
        for client in clients:
            client.close()

    # -- one server -----------------------------------------------------------------------

    def _deliver_to(self, server: Server, message: QueueFile, recipients: list[Recipient], todo: list[int],
                    outcomes: list[Outcome | None], settings: DestinationSettings, started: float) -> list[int]:
        """Try `todo` at one server; return the recipients the next server should try. `started`
        is when the delivery began (time.monotonic()): until this server's connection is ready
        it was set-up."""
        for fresh in (False, True):
            try:
                client, reused = self._connection(server, message.queue_id, fresh)
            except SMTPError as exc:
                problem = _deferred(exc.reply.dsn, exc.reply.describe(server.peer), server.peer,
                                    time.monotonic() - started)
                _note_failure(message, problem.reply, server)
                for index in todo:
                    outcomes[index] = problem
                return todo
            setup = time.monotonic() - started
            replies = self._send(client, message, [recipients[i] for i in todo], settings.recipients)
            if client.bdat_failure is not None:
                self._note_bdat_failure(server, client, message.queue_id)
                if any(reply.status == DEFERRED for reply in replies):
                    continue  # at once, with DATA on a new connection
            if not (reused and all(reply.local and reply.code == 421 for reply in replies)):
                break  # only a kept connection that died under us earns a fresh try
        after: list[int] = []
        for index, reply in zip(todo, replies, strict=True):
            text = str(reply) if reply.ok else reply.describe(client.peer)
            outcomes[index] = Outcome(reply.status, reply.dsn, text, client.peer, "DSN" in client.extensions, setup)
            if reply.status == DEFERRED:
                after.append(index)
        client.messages += 1
        spent = settings.messages_per_connection is not None and client.messages >= settings.messages_per_connection
        if client.is_open and not spent:  # whether the server said something since is checked when it is reused
            self._keep(server, client)
        elif client.is_open:
            client.close()
        return after

    def _send(self, client: SMTPClient, message: QueueFile, recipients: list[Recipient], per_transaction: int) -> list:
        """Send in transactions of at most `per_transaction` recipients (the destination's
        `recipients`), opening new ones while the server takes only part of them (452 too many
        recipients, RFC 5321 4.5.3.1.10)."""
        replies: list = [None] * len(recipients)
        waiting = list(range(len(recipients)))
        while waiting:
            batch, later = waiting[:per_transaction], waiting[per_transaction:]
            answers = client.send(message.sender, [recipients[i] for i in batch], message.message,
                                  ret=message.ret, envid=message.envid)
            for i, reply in zip(batch, answers, strict=True):
                replies[i] = reply
            unsent = [i for i, reply in zip(batch, answers, strict=True) if reply.unsent]
            if len(unsent) == len(batch) or (unsent and not client.is_alive()):  # none taken now: later
                for i in later:
                    replies[i] = answers[-1]
                break
            waiting = unsent + later
        return replies

    def _note_bdat_failure(self, server: Server, client: SMTPClient, queue_id: str) -> None:
        """Send to `server` with DATA for the life of the worker, and say so once."""
        with self._lock:
            known = server in self.without_bdat
            self.without_bdat.add(server)
        if not known:
            assert client.bdat_failure is not None
            _log(server).warning("%s: host %s offers CHUNKING but fails BDAT (%s); using DATA with it from now on",
                        queue_id, client.peer, client.bdat_failure.describe(client.peer))

    def _connection(self, server: Server, queue_id: str, fresh: bool) -> tuple[SMTPClient, bool]:
        """A kept connection to `server` if one is alive (and `fresh` is not asked), else a new
        one; the flag says which. A new one first closes the oldest idle connection to another
        server of the same destination, if there is one: the dispatcher may have counted on this
        delivery reusing it, and connections to a destination must never exceed what it counted."""
        with self._lock:
            clients = self.kept.get(server)
            kept = clients.pop() if clients else None
            if clients == []:
                del self.kept[server]
            spare = None if kept else self._oldest_idle(self.destination_of.get(server, ""))
            self._take_promise(self.destination_of.get(server, ""))
        if spare is not None:
            spare.abort()  # no QUIT: a session must not wait a round trip, nor the old one linger
        if kept is not None:
            if not fresh and kept[0].is_alive():
                return kept[0], True
            kept[0].abort()
        return self._dial(server, queue_id), False

    def _dial(self, server: Server, why: str) -> SMTPClient:
        """A new connection under the server's TLS policy, in plain text if that policy allows it
        after a failed handshake (logged, after `why`: the queue id, or what a probe is for). A
        server its policy refuses (DANE: policy/dane.py) is not connected to at all."""
        try:
            if server.tls.refusal:
                raise refused(server.peer, server.tls)
            return self._opened(server, self._open(server, server.tls))
        except TLSFallback as exc:  # its text names the host, what failed and why
            _log(server).warning("%s: %s; retrying without TLS", why, exc.reply.text)
            self.tls_outcomes.failed(server, exc)
            return self._opened(server, self._open(server, TLSPolicy(TLS_NONE)))
        except TLSFailure as exc:
            self._count_session(server, "failed")
            self.tls_outcomes.failed(server, exc)
            if server.sts is None:
                raise
            return self._sts_failed(server, why, exc)

    def _sts_failed(self, server: Server, why: str, exc: TLSFailure) -> SMTPClient:
        """TLS failed under an MTA-STS policy: under enforce the delivery is deferred, the reason
        naming the policy; under testing the failure is logged with its TLS report result type
        and the server used under its own TLS policy, as without the policy."""
        assert server.sts is not None
        text = f"{server.sts.label}: {exc.reply.text}"
        if server.sts.fallback is None:
            raise TLSFailure(replace(exc.reply, text=text)) from None
        _log(server).warning("%s: %s (result %s); delivering as without the policy", why, text, exc.result_type)
        return self._dial(replace(server, tls=server.sts.fallback, sts=None, report_domain=""), why)  # counted once

    def _opened(self, server: Server, client: SMTPClient) -> SMTPClient:
        """Log how a new session is protected, as Postfix does (`Verified TLS connection
        established to HOST[IP]:PORT: TLSv1.3 with cipher ...`), and count it."""
        if client.tls:
            under = f" ({server.sts.label})" if server.sts else ""
            _log(server).info("%s TLS connection established to %s: %s%s", client.tls_trust, client.peer, client.tls,
                              under)
        self._count_session(server, client.tls_trust.lower() if client.tls else "plaintext")
        self.tls_outcomes.opened(server, client)
        return client

    def _count_session(self, server: Server, outcome: str) -> None:
        if not server.socket_path:
            with self._lock:
                self.tls_sessions[(server.tls.level, outcome)] += 1

    def take_tls_sessions(self) -> list[tuple[str, str, int]]:
        """The sessions opened since the last call, as (level, outcome, count), for the metrics."""
        with self._lock:
            taken, self.tls_sessions = self.tls_sessions, Counter()
        return [(level, outcome, count) for (level, outcome), count in taken.items()]

    def _oldest_idle(self, destination: str) -> SMTPClient | None:
        """Take the connection idle longest to any server of `destination` out of the pool (the
        lock held)."""
        idle = [(clients[0][1], other) for other, clients in self.kept.items()
                if self.destination_of.get(other) == destination]
        if not idle:
            return None
        _, other = min(idle, key=lambda entry: entry[0])
        client = self.kept[other].pop(0)[0]
        if not self.kept[other]:
            del self.kept[other]
        return client

    def _open(self, server: Server, tls: TLSPolicy) -> SMTPClient:
        timeouts = self.config.smtp_timeouts
        chunking = server not in self.without_bdat
        if server.socket_path:
            return SMTPClient.connect_unix(server.socket_path, helo_name=self.helo_name, timeouts=timeouts,
                                           auth=server.auth, chunking=chunking)
        return SMTPClient.connect(server.name, server.port, ip=server.ip, helo_name=self.helo_name,
                                  lmtp=server.lmtp, timeouts=timeouts, tls=tls, tls_name=server.name,
                                  ca_file=self.config.smtp_tls_ca or None, auth=server.auth,
                                  allow_plaintext_auth=self.config.smtp_plaintext_auth, chunking=chunking)

    def _keep(self, server: Server, client: SMTPClient) -> None:
        with self._lock:
            self.kept.setdefault(server, []).append((client, time.monotonic()))
            if sum(len(clients) for clients in self.kept.values()) <= self.max_kept:
                return
            oldest = min(self.kept, key=lambda s: self.kept[s][0][1])
            evicted = self.kept[oldest].pop(0)[0]
            if not self.kept[oldest]:
                del self.kept[oldest]
        evicted.abort()  # no QUIT: a session must not wait a round trip, nor the old one linger

    # -- where to deliver -----------------------------------------------------------------

    def site_of(self, domain: str) -> str:
        """The site MX rollup counts a domain against (mx_hosts.site_destination); "" when its
        MX hosts cannot be found now."""
        try:
            return site_destination(host.name for host in self._lookup(domain))
        except (MXLookupError, ResolverConfigError):
            return ""

    def probe(self, hop: NextHop, recipient: str, sender: str) -> tuple[str, str]:
        """Recipient verification's callout: ask the servers of `hop`, in the order delivery
        tries them and connected as delivery connects (TLS, AUTH), whether they take `recipient`
        (MAIL FROM, RCPT TO, RSET, QUIT; never DATA). The status code and text of the first
        final answer (2.X.X or 5.X.X), else of the last temporary failure."""
        try:
            _, servers = self._hosts_and_servers(hop)
        except (MXLookupError, ResolverConfigError) as exc:
            return _lookup_failure(exc, hop.kind == MX)
        failure = ("4.4.1", f"no server to try for {hop}")
        for server in servers:
            try:
                client = self._dial(server, f"probe of <{recipient}>")
                try:
                    reply = client.verify(sender, recipient)
                finally:
                    client.close()
            except SMTPError as exc:
                failure = ("4" + exc.reply.dsn[1:], exc.reply.describe(server.peer))
                continue
            if reply.code // 100 != 4:
                return reply.dsn, str(reply) if reply.ok else reply.describe(client.peer)
            failure = (reply.dsn, reply.describe(client.peer))
        return failure

    def _hosts_and_servers(self, hop: NextHop) -> tuple[list[MXHost] | None, list[Server]]:
        """The MX hosts of MX routing (None for other next hops) and the servers to try, in
        order, each under the TLS policy that applies to it; MXLookupError or ResolverConfigError
        when DNS gives none."""
        hosts, servers, settings = self.servers_under_tls(hop)
        if hop.kind == MX and sts_applies(settings.tls is not None, settings.tls_policy(self.config.smtp_tls).level,
                                          any(server.tls.tlsa for server in servers)):
            servers = self._apply_sts(hop.argument, servers)
        return hosts, servers

    def servers_under_tls(self, hop: NextHop) -> tuple[list[MXHost] | None, list[Server], DestinationSettings]:
        """The MX hosts of MX routing (None for other next hops), the servers to try in order,
        each under its TLS policy before any MTA-STS policy (the names its certificate must match,
        and under a DANE level its host's TLSA records or why it is not used), and the settings
        whose TLS keys apply. Delivery's decision, which `qrouter route --resolve` shows as it
        is; MXLookupError or ResolverConfigError when DNS gives none."""
        hosts = self._lookup(hop.argument) if hop.kind == MX else None
        servers = self._servers(hop) if hosts is None else _expand(hosts, self.config.smtp_port, lmtp=False,
                                                                   auth=None)
        settings = self.rules.for_tls(hop.destination, self._site(hop, hosts))
        tls = settings.tls_policy(self.config.smtp_tls)
        servers = [_under(server, tls, hop.argument if hop.kind == MX else server.name, hop.kind == MX)
                   for server in servers]
        if tls.level in DANE_LEVELS:
            servers = self._dane(servers)
        return hosts, servers, settings

    def _apply_sts(self, domain: str, servers: list[Server]) -> list[Server]:
        """The servers of MX delivery to `domain` under its MTA-STS policy, if it has one
        (workers/mta_sts.py Policies.apply); MXLookupError when the policy leaves none. The one
        place a policy applies."""
        with self._lock:
            if self._sts is None:
                from workers.mta_sts import Policies  # the HTTP library only once MX routing is used

                self._sts = Policies(self._resolver, self.config.queue_dir, self.config.smtp_tls_ca or None,
                                     recorder=self.tls_outcomes)
        return self._sts.apply(domain, servers)

    def _dane(self, servers: list[Server]) -> list[Server]:
        """The servers under a DANE level, each under its host's policy (policy/dane.py), the
        TLSA records looked up once a host and port (a host's addresses share them): at the
        end of its name's validated CNAME chain first, then at the name (RFC 7672 2.2.2)."""
        from workers import mx_lookup

        policies: dict[tuple[str, int], TLSPolicy] = {}
        placed = []
        for server in servers:
            key = (server.name, server.port)
            if key not in policies:
                policies[key] = mx_lookup.host_tls(server.tls, server.name, server.port, server.secure, self._dns(),
                                                   server.alias)
            placed.append(replace(server, tls=policies[key]))
        return placed

    def _site(self, hop: NextHop, hosts: list[MXHost] | None) -> str:
        """The site MX rollup counts `hop` against, its MX hosts known; "" when it has none."""
        rollup = hosts and self.rules.for_destination(hop.destination).mx_rollup
        return site_destination(host.name for host in hosts) if rollup else ""

    def mx_failure(self, domain: str) -> tuple[str, str] | None:
        """Why mail to `domain` by MX routing would fail now before any connection, as delivery
        says it (status code, text), or None when DNS gives hosts to try: recipient verification
        asks this (policy/verify.py)."""
        try:
            self._lookup(domain)
        except (MXLookupError, ResolverConfigError) as exc:
            return _lookup_failure(exc, mx=True)
        return None

    def _servers(self, hop: NextHop) -> list[Server]:
        lmtp = hop.kind == LMTP
        if lmtp and hop.argument.startswith("/"):
            return [Server(hop.argument, lmtp=True, socket_path=hop.argument)]
        hosts = _relay_hosts(hop.argument)
        start = self.turn.get(hop.argument, 0)
        self.turn[hop.argument] = start + 1
        servers: list[Server] = []
        failure: MXLookupError | None = None
        for destination, port in hosts[start % len(hosts):] + hosts[:start % len(hosts)]:
            try:
                servers += self._relay_servers(destination, port, lmtp)
            except MXLookupError as exc:
                failure = exc
        if not servers and failure is not None:
            raise failure
        return servers

    def _relay_servers(self, destination: str, port: int | None, lmtp: bool) -> list[Server]:
        """The servers of one relay host. Those of an IP address never change, so they are
        worked out once: a relayhost given as an address costs no parsing per message."""
        key = (destination, port, lmtp)
        fixed = self._fixed.get(key)
        if fixed is not None:
            return fixed
        bare = destination.strip("[]")
        address = address_literal(bare)
        found = ([MXHost(address, 0, (address,))] if address
                 else self._lookup(relay_lookup_name(destination, self.helo_name, lmtp)))
        servers = _expand(found, port or (LMTP_PORT if lmtp else self.config.smtp_port), lmtp=lmtp,
                          auth=self.credentials.get(bare.lower()))
        if address:
            self._fixed[key] = servers
        return servers

    def _lookup(self, destination: str) -> list[MXHost]:
        """mx_lookup.next_hops, with the DNS library loaded on first use: a worker that only
        relays to addresses never loads it."""
        from workers import mx_lookup

        return mx_lookup.next_hops(destination, self._dns())

    def _dns(self) -> dns.resolver.Resolver:
        """The worker's resolver, made on first use: validating answers asked for when DNSSEC is
        trusted (dns-support-level dnssec)."""
        from workers import mx_lookup

        if self._resolver is None:
            self._resolver = mx_lookup.make_resolver(self.config.dns_servers, self.config.dns_timeout,
                                                     cache=mx_lookup.CACHE_NAMES,
                                                     dnssec=self.config.dns_support_level == DNS_DNSSEC)
        return self._resolver


def relay_lookup_name(destination: str, helo_name: str, lmtp: bool) -> str:
    """What a relay host (`name` or `[name]`, as the next hop writes it) is looked up as:
    `[name]` (and any LMTP host) by its A/AAAA records, a bare name by MX lookup first, as Postfix
    does. A short name, bracketed or not, is qualified under our domain (that of `helo_name`);
    `localhost` means this machine (RFC 6761), and an address is left as it is."""
    bare = destination.strip("[]")
    domain = helo_name.partition(".")[2]
    if "." not in bare and ":" not in bare and domain and bare.lower() != "localhost":
        bare = f"{bare}.{domain}"
    return f"[{bare}]" if destination.startswith("[") or lmtp else bare


def _lookup_failure(exc: MXLookupError | ResolverConfigError, mx: bool) -> tuple[str, str]:
    """The status code and text of a failed lookup: final (5.X.X) only when DNS says so of the
    recipient's own domain (MX routing), never of a relay host the configuration names."""
    temporary = not isinstance(exc, MXLookupError) or exc.temporary or not mx
    dsn = "4.3.5" if isinstance(exc, ResolverConfigError) else exc.dsn
    return ("4" + dsn[1:] if temporary else dsn), str(exc)


@functools.lru_cache(maxsize=256)
def _relay_hosts(text: str) -> tuple[tuple[str, int | None], ...]:
    """parse_hosts, once per relay host list rather than once per message."""
    return tuple(parse_hosts(text))


@functools.lru_cache(maxsize=4096)
def _under(server: Server, tls: TLSPolicy, next_hop: str, mx: bool) -> Server:
    """`server` under the policy `tls`, the names its certificate must match resolved, and, for
    MX routing, the domain its sessions are reported to; made once for a stream of mail to the
    same server, not once per message."""
    return replace(server, tls=replace(tls, match=names_to_match(tls, server.name, next_hop)),
                   report_domain=next_hop if mx else "")


def _expand(hosts: list[MXHost], port: int, *, lmtp: bool, auth: tuple[str, str] | None) -> list[Server]:
    return [Server(host.name, ip, port, lmtp=lmtp, auth=auth, secure=host.secure, alias=host.alias)
            for host in hosts for ip in host.addresses]


def _log(server: Server) -> logging.Logger:
    """Lines about a server speak as smtp, or lmtp for an LMTP server, as Postfix's clients do."""
    return logger(service_of(LMTP if server.lmtp else SMTP))


def _note_failure(message: QueueFile, text: str, server: Server) -> None:
    """A server that could not be used, logged once as Postfix does ("connect to ...: Connection
    refused") and kept in the message's history (stored if it stays queued): when the next server
    takes the message, its `sent` line alone would leave no trace of the server that failed."""
    _log(server).info("%s: %s", message.queue_id, text)
    message.add_log(time.time(), text)


def _deferred(dsn: str, text: str, relay: str, setup: float) -> Outcome:
    """A server we could not use: never final, since another server or a later attempt may work."""
    return Outcome(DEFERRED, "4" + dsn[1:], text, relay, setup=setup)
