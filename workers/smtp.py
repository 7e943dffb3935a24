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
from dataclasses import dataclass

from policy.next_hop import LMTP, MX, NextHop, parse_hosts
from router.config import Config
from router.queue_file import QueueFile, Recipient
from workers.mx_hosts import MXHost, MXLookupError, ResolverConfigError, address_literal
from workers.smtp_client import LMTP_PORT, SMTP_PORT, TLS_NONE, SMTPClient, SMTPError, TLSFallback
from workers.transport import BOUNCED, DEFERRED, Outcome

log = logging.getLogger("qrouter")



@dataclass(frozen=True)
class Server:
    """One place to deliver to: a host name with one of its addresses, or a Unix socket."""

    name: str
    ip: str = ""
    port: int = SMTP_PORT
    lmtp: bool = False
    socket_path: str = ""
    auth: tuple[str, str] | None = None

    @property
    def peer(self) -> str:
        return f"unix[{self.socket_path}]" if self.socket_path else f"{self.name}[{self.ip}]:{self.port}"


class SMTPTransport:
    def __init__(self, config: Config):
        self.config = config
        self.helo_name = config.hostname
        self.credentials = config.relay_auth or {}
        self.kept: dict[Server, list[tuple[SMTPClient, float]]] = {}  # idle connections, last used last
        # Kept connections: a destination's are bounded by its share (see _reserve); this bounds
        # them all, above the sessions, so mail to many destinations by turns does not churn them.
        self.max_kept = 4 * config.sessions_per_worker
        self.share = config.destination_share
        self.in_use: Counter[str] = Counter()  # connections a session holds, by destination
        self.destination_of: dict[Server, str] = {}
        self._lock = threading.Lock()
        self.turn: dict[str, int] = {}
        self._resolver = None
        self._fixed: dict[tuple[str, int | None, bool], list[Server]] = {}  # see _relay_servers
        self.without_bdat: set[Server] = set()  # they offer CHUNKING but failed BDAT: DATA for them

    # -- the Transport interface ----------------------------------------------------------

    def deliver(self, message: QueueFile, recipients: list[Recipient], hop: NextHop) -> list[Outcome]:
        self.close_idle()
        try:
            servers = self._servers(hop)
        except (MXLookupError, ResolverConfigError) as exc:
            temporary = not isinstance(exc, MXLookupError) or exc.temporary or hop.kind != MX
            dsn = "4.3.5" if isinstance(exc, ResolverConfigError) else exc.dsn
            status = DEFERRED if temporary else BOUNCED
            return Outcome.same_for(recipients, status, "4" + dsn[1:] if temporary else dsn, str(exc), "none")
        outcomes: list[Outcome | None] = [None] * len(recipients)
        todo = list(range(len(recipients)))
        for server in servers:
            self._reserve(server, hop.destination)
            try:
                todo = self._deliver_to(server, message, recipients, todo, outcomes)
            finally:
                with self._lock:
                    self.in_use[hop.destination] -= 1
            if not todo:
                break
        return [outcome or Outcome(DEFERRED, "4.4.1", f"no server to try for {hop}", "none")
                for outcome in outcomes]

    def close_idle(self) -> None:
        limit = time.monotonic() - self.config.smtp_idle_timeout
        with self._lock:
            stale = [client for clients in self.kept.values() for client, last_used in clients if last_used <= limit]
            for server, clients in list(self.kept.items()):
                clients[:] = [(client, last_used) for client, last_used in clients if last_used > limit]
                if not clients:
                    del self.kept[server]
        for client in stale:  # QUIT outside the lock: it waits for the server
            client.close()

    def close(self) -> None:
        with self._lock:
            clients = [client for kept in self.kept.values() for client, _ in kept]
            self.kept.clear()
        for client in clients:
            client.close()

    # -- one server -----------------------------------------------------------------------

    def _reserve(self, server: Server, destination: str) -> None:
        """Count a connection to `server` as in use for `destination`, and close kept ones to
        the destination's other servers as needed so that, in use and kept together, this
        worker never has more than its share of the destination (Config.destination_share)."""
        evicted = []
        with self._lock:
            self.in_use[destination] += 1
            self.destination_of[server] = destination
            if not self.kept.get(server):  # no kept connection to reuse: a new one will be opened
                idle = sorted(((last_used, other) for other, clients in self.kept.items()
                               if self.destination_of.get(other) == destination for _, last_used in clients),
                              key=lambda entry: entry[0])
                while idle and self.in_use[destination] + len(idle) > self.share:
                    _, other = idle.pop(0)
                    evicted.append(self.kept[other].pop(0)[0])
                    if not self.kept[other]:
                        del self.kept[other]
        for client in evicted:
            client.abort()  # no QUIT: a session must not wait a round trip, nor the old one linger

    def _deliver_to(self, server: Server, message: QueueFile, recipients: list[Recipient], todo: list[int],
                    outcomes: list[Outcome | None]) -> list[int]:
        """Try `todo` at one server; return the recipients the next server should try."""
        for fresh in (False, True):
            try:
                client, reused = self._connection(server, message.queue_id, fresh)
            except SMTPError as exc:
                problem = _deferred(exc.reply.dsn, exc.reply.describe(server.peer), server.peer)
                _note_failure(message, problem.reply)
                for index in todo:
                    outcomes[index] = problem
                return todo
            replies = self._send(client, message, [recipients[i] for i in todo])
            if client.bdat_failure is not None:
                self._note_bdat_failure(server, client, message.queue_id)
                if any(reply.status == DEFERRED for reply in replies):
                    continue  # at once, with DATA on a new connection
            if not (reused and all(reply.local and reply.code == 421 for reply in replies)):
                break  # only a kept connection that died under us earns a fresh try
        after: list[int] = []
        for index, reply in zip(todo, replies, strict=True):
            text = str(reply) if reply.ok else reply.describe(client.peer)
            outcomes[index] = Outcome(reply.status, reply.dsn, text, client.peer, "DSN" in client.extensions)
            if reply.status == DEFERRED:
                after.append(index)
        if client.is_open:  # whether the server said something since is checked when it is reused
            self._keep(server, client)
        return after

    def _send(self, client: SMTPClient, message: QueueFile, recipients: list[Recipient]) -> list:
        """Send, opening new transactions while the server takes only part of the recipients
        (452 too many recipients, RFC 5321 4.5.3.1.10)."""
        replies: list = [None] * len(recipients)
        waiting = list(range(len(recipients)))
        while waiting:
            answers = client.send(message.sender, [recipients[i] for i in waiting], message.message,
                                  ret=message.ret, envid=message.envid)
            unsent = [i for i, reply in zip(waiting, answers, strict=True) if reply.unsent]
            for i, reply in zip(waiting, answers, strict=True):
                replies[i] = reply
            if not unsent or len(unsent) == len(waiting) or not client.is_alive():
                break
            waiting = unsent
        return replies

    def _note_bdat_failure(self, server: Server, client: SMTPClient, queue_id: str) -> None:
        """Send to `server` with DATA for the life of the worker, and say so once."""
        with self._lock:
            known = server in self.without_bdat
            self.without_bdat.add(server)
        if not known:
            assert client.bdat_failure is not None
            log.warning("%s: host %s offers CHUNKING but fails BDAT (%s); using DATA with it from now on",
                        queue_id, client.peer, client.bdat_failure.describe(client.peer))

    def _connection(self, server: Server, queue_id: str, fresh: bool) -> tuple[SMTPClient, bool]:
        """A kept connection to `server` if one is alive (and `fresh` is not asked), else a new
        one; the flag says which."""
        with self._lock:
            clients = self.kept.get(server)
            kept = clients.pop() if clients else None
            if clients == []:
                del self.kept[server]
        if kept is not None:
            if not fresh and kept[0].is_alive():
                return kept[0], True
            kept[0].abort()
        try:
            return self._open(server, self.config.smtp_tls), False
        except TLSFallback as exc:  # its text names the host, what failed and why
            log.warning("%s: %s; retrying without TLS", queue_id, exc.reply.text)
            return self._open(server, TLS_NONE), False

    def _open(self, server: Server, tls: str) -> SMTPClient:
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
        evicted.abort()  # see _reserve

    # -- where to deliver -----------------------------------------------------------------

    def _servers(self, hop: NextHop) -> list[Server]:
        if hop.kind == MX:
            return _expand(self._lookup(hop.argument), self.config.smtp_port, lmtp=False, auth=None)
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
        found = [MXHost(address, 0, (address,))] if address else self._relay(destination, bare, lmtp)
        servers = _expand(found, port or (LMTP_PORT if lmtp else self.config.smtp_port), lmtp=lmtp,
                          auth=self.credentials.get(bare.lower()))
        if address:
            self._fixed[key] = servers
        return servers

    def _relay(self, destination: str, bare: str, lmtp: bool) -> list[MXHost]:
        """A relay host given by name: `[name]` (and any LMTP host) by its A/AAAA records, a bare
        name by MX lookup first, as Postfix does. A short name, bracketed or not, is qualified
        under our domain."""
        if destination.startswith("[") or lmtp:
            return self._lookup(f"[{self._qualify(bare)}]")
        return self._lookup(self._qualify(bare))

    def _qualify(self, name: str) -> str:
        """`name` under our domain if it has no dot; `localhost` means this machine (RFC 6761)."""
        domain = self.helo_name.partition(".")[2]
        return f"{name}.{domain}" if "." not in name and domain and name.lower() != "localhost" else name

    def _lookup(self, destination: str) -> list[MXHost]:
        """mx_lookup.next_hops, with the DNS library loaded on first use: a worker that only
        relays to addresses never loads it."""
        from workers import mx_lookup

        if self._resolver is None:
            self._resolver = mx_lookup.make_resolver(self.config.dns_servers, self.config.dns_timeout)
        return mx_lookup.next_hops(destination, self._resolver)


@functools.lru_cache(maxsize=256)
def _relay_hosts(text: str) -> tuple[tuple[str, int | None], ...]:
    """parse_hosts, once per relay host list rather than once per message."""
    return tuple(parse_hosts(text))


def _expand(hosts: list[MXHost], port: int, *, lmtp: bool, auth: tuple[str, str] | None) -> list[Server]:
    return [Server(host.name, ip, port, lmtp=lmtp, auth=auth) for host in hosts for ip in host.addresses]


def _note_failure(message: QueueFile, text: str) -> None:
    """A server that could not be used, logged once as Postfix does ("connect to ...: Connection
    refused") and kept in the message's history (stored if it stays queued): when the next server
    takes the message, its `sent` line alone would leave no trace of the server that failed."""
    log.info("%s: %s", message.queue_id, text)
    message.add_log(time.time(), text)


def _deferred(dsn: str, text: str, relay: str) -> Outcome:
    """A server we could not use: never final, since another server or a later attempt may work."""
    return Outcome(DEFERRED, "4" + dsn[1:], text, relay)
