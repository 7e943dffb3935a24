"""MTA-STS policies of recipient domains (RFC 8461) as a delivering worker finds them: the
`_mta-sts` TXT record by qrouter's resolver, the policy fetched over HTTPS, and the policies kept
in the spool (QUEUE-DIR/mta-sts/DOMAIN, one small JSON file a domain, written afresh and renamed
into place) so that a restart, or DNS or the web server failing, does not drop one.

When a policy is looked for (RFC 8461 3.3, 5.1):
- the TXT record names the id of the cached policy, and it is not past half its max_age: the
  cached policy, asked of nobody;
- it names another id, or none is cached, or the cached one is due for a refresh: the policy is
  fetched; if that fails, the cached one (while it has not expired), else none;
- DNS gives no record or fails: the cached one while it has not expired, else none.
A policy past its max_age is dropped, from memory and the spool. A fetch that failed is not
tried again for the same id for FAILED_FETCH_PAUSE seconds, nor a TXT lookup that DNS did not
answer: mail to a domain whose web or name server is down does not wait for it once a message.

The policy's host is resolved by qrouter's resolver too (dns-servers), the connection made to
that address with the certificate verified for mta-sts.DOMAIN (smtp-tls-ca, else the system's
CAs); no redirect is followed, the body is bounded (MAX_POLICY_BYTES) and so is the time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import dns.exception
import dns.name
import dns.resolver
import urllib3

from policy.mta_sts import (
    ENFORCE,
    MAX_POLICY_BYTES,
    NONE,
    Applied,
    STSError,
    STSPolicy,
    enforced_tls,
    parse_policy,
    parse_txt,
)
from policy.tls_report import STS, STS_POLICY_FETCH_ERROR, STS_POLICY_INVALID, STS_WEBPKI_INVALID, VALIDATION_FAILURE
from router.config import Config
from router.spool.durable import unlink_quietly, write_synced
from workers.mx_hosts import MXLookupError
from workers.mx_lookup import lookup_txt, resolve_host
from workers.tls_outcomes import Recorder

DIRECTORY = "mta-sts"  # in the spool
FETCH_TIMEOUT = 20.0  # seconds for one policy fetch: connection, handshake and body together
FAILED_FETCH_PAUSE = 300.0  # seconds before a failed fetch of the same policy id is tried again
MEMORY = 4096  # domains a worker remembers (policies, failed fetches, lines logged); the spool keeps them all
FETCH_LOCKS = 64  # fetches of different domains at once; those of one domain are one after the other
WELL_KNOWN = "/.well-known/mta-sts.txt"
FETCHED, CACHE = "fetched", "cache"
_FILE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")

log = logging.getLogger("qrouter.smtp")


class FetchError(Exception):
    """A policy that could not be fetched or read; `result_type` is how a TLS report names it."""

    def __init__(self, result_type: str, message: str):
        super().__init__(message)
        self.result_type = result_type


@dataclass(frozen=True)
class Found:
    """The policy of `domain` that applies now: its id, when it was fetched and when it expires
    (time.time()), and `source`, FETCHED now or from the CACHE."""

    domain: str
    policy: STSPolicy
    policy_id: str
    fetched: float
    expires: float
    source: str = CACHE

    @property
    def refresh_due(self) -> float:
        """When it should be fetched again though its id has not changed: halfway to expiry."""
        return self.fetched + (self.expires - self.fetched) / 2

    def describe(self) -> str:
        """`MTA-STS enforce policy of example.com`, as log lines and reasons name it."""
        return f"MTA-STS {self.policy.mode} policy of {self.domain}"


class PolicyCache:
    """The policies kept in the spool. A file that cannot be read counts as none; one that
    cannot be written leaves the policy in memory only (said once)."""

    def __init__(self, queue_dir: str) -> None:
        self.directory = os.path.join(queue_dir, DIRECTORY)
        self.trouble_logged = False

    def path(self, domain: str) -> str | None:
        """Where `domain`'s policy is kept; None for a name that cannot be a file name here."""
        return os.path.join(self.directory, domain) if _FILE_NAME.fullmatch(domain) else None

    def load(self, domain: str, now: float) -> Found | None:
        path = self.path(domain)
        if path is None:
            return None
        try:
            with open(path, "rb") as handle:
                record = json.loads(handle.read(2 * MAX_POLICY_BYTES))
            found = Found(domain, parse_policy(record["policy"], f"{path} (cached)"), str(record["id"]),
                          float(record["fetched"]), float(record["expires"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:  # STSError is a ValueError
            log.warning("cannot read the cached MTA-STS policy %s: %s; fetching it again", path, exc)
            return None
        if found.expires <= now:
            log.info("%s expired (fetched %s); dropped", found.describe(), _when(found.fetched))
            unlink_quietly(path)
            return None
        return found

    def store(self, found: Found, text: str) -> None:
        path = self.path(found.domain)
        if path is None:
            return
        data = json.dumps({"domain": found.domain, "id": found.policy_id, "fetched": found.fetched,
                           "expires": found.expires, "policy": text}).encode()
        staged = f"{path}.{os.getpid()}.{threading.get_ident()}.new"
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            write_synced(staged, data)
            os.rename(staged, path)
        except OSError as exc:
            unlink_quietly(staged)
            if not self.trouble_logged:
                self.trouble_logged = True
                log.warning("cannot write %s: %s; MTA-STS policies are kept in memory only", path,
                            exc.strerror or exc)


class Policies:
    """The MTA-STS policies a worker applies: looked up per delivery, remembered in memory, kept
    in the spool. Shared by the worker's session threads."""

    def __init__(self, resolver: dns.resolver.Resolver, queue_dir: str, ca_file: str | None,
                 fetch_timeout: float = FETCH_TIMEOUT, keep: bool = True, recorder: Recorder | None = None) -> None:
        self.resolver = resolver
        self.recorder = recorder  # counts a failed fetch for TLS reports (workers/tls_outcomes.py)
        self.cache = PolicyCache(queue_dir)
        self.keep = keep  # whether a policy fetched is written to the spool (not by `qrouter route`)
        self.ca_file = ca_file
        self.fetch_timeout = fetch_timeout
        self.known: dict[str, Found | None] = {}  # what memory holds, None: the spool has nothing
        self.failed: dict[tuple[str, str], float] = {}  # (domain, id) -> when a fetch of it failed
        self.noted: set[tuple[str, ...]] = set()  # what _note_once said
        self._lock = threading.Lock()
        self._fetching = [threading.Lock() for _ in range(FETCH_LOCKS)]

    def lookup(self, domain: str, now: float | None = None) -> Found | None:
        """The policy that applies to mail for `domain` now, or None (the domain has none, or
        none could be found and none is cached)."""
        now = time.time() if now is None else now
        try:  # in A-labels, as DNS, the certificate and the cache's file name have it
            domain = dns.name.from_text(domain).to_text(omit_final_dot=True).lower()
        except (dns.exception.DNSException, UnicodeError):
            return None  # no name DNS could be asked about: MX routing has said so already
        with self._fetching[hash(domain) % FETCH_LOCKS]:  # one fetch of a domain at a time; the others take its result
            return self._lookup(domain, now)

    def _lookup(self, domain: str, now: float) -> Found | None:
        cached = self._cached(domain, now)
        if self._failed_lately(domain, "", now):  # DNS did not answer: not asked again at each message
            return cached
        try:
            policy_id = parse_txt(lookup_txt(f"_mta-sts.{domain}", self.resolver), domain)
        except MXLookupError as exc:
            self._remember(self.failed, (domain, ""), now)
            log.debug("_mta-sts.%s not found now: %s", domain, exc)
            return cached
        except STSError as exc:
            log.debug("no MTA-STS policy published by %s: %s", domain, exc)
            return cached
        if policy_id is None:
            return cached
        if cached is not None and cached.policy_id == policy_id and now < cached.refresh_due:
            return cached
        if self._failed_lately(domain, policy_id, now):
            return cached
        try:
            policy, text = fetch(domain, self.resolver, self.ca_file, self.fetch_timeout)
        except FetchError as exc:
            self._remember(self.failed, (domain, policy_id), now)
            kept = f"; {cached.describe()} (cached, id {cached.policy_id}) still applies" if cached else \
                "; delivering as without a policy"
            log.warning("MTA-STS policy of %s (id %s) not fetched: %s (%s)%s", domain, policy_id, exc,
                        exc.result_type, kept)
            if self.recorder is not None:
                self.recorder.record(domain, STS, (), "", exc.result_type, "", "", str(exc))
            return cached
        found = Found(domain, policy, policy_id, now, now + policy.max_age, FETCHED)
        log.info("%s fetched (id %s): %s", found.describe(), policy_id, policy.describe())
        if self.keep:
            self.cache.store(found, text)
        self._remember(self.known, domain, found)
        with self._lock:
            self.failed.pop((domain, policy_id), None)
        return found

    def apply(self, domain: str, servers: list[Any]) -> list[Any]:
        """The servers of MX delivery to `domain` (workers/smtp.py Server: `name`, `tls`, `sts`)
        under its policy. Enforce: only the MX hosts it names, each under enforced_tls; none left
        is MXLookupError 4.7.0 saying why. Testing: the MX hosts it names under enforced_tls
        with their own policy as the fallback, the others as they were; the hosts it does not
        name are logged. No policy, or mode none: the servers as they were."""
        found = self.lookup(domain)
        if found is None or found.policy.mode == NONE:
            return servers
        label = found.describe()
        refused = list(dict.fromkeys(server.name for server in servers if not found.policy.allows(server.name)))
        enforce = found.policy.mode == ENFORCE
        if refused:
            why = f"{label}: {', '.join(refused)} not in the policy's mx list"
            if enforce and len(refused) == len({server.name for server in servers}):
                raise MXLookupError("4.7.0", why)
            self._note_once((domain, found.policy_id, *refused), f"{why}; " + (
                "not used" if enforce else f"used all the same (testing, result {VALIDATION_FAILURE})"))
        used = []
        for server in servers:
            if found.policy.allows(server.name):
                used.append(replace(server, tls=enforced_tls(server.name, server.tls),
                                    sts=Applied(label, domain, found.policy, None if enforce else server.tls)))
            elif not enforce:
                used.append(server)
        return used

    def _failed_lately(self, domain: str, policy_id: str, now: float) -> bool:
        """Whether the fetch of this policy id (or, for "", the TXT lookup) failed less than
        FAILED_FETCH_PAUSE seconds ago."""
        with self._lock:
            failed = self.failed.get((domain, policy_id), -FAILED_FETCH_PAUSE)
        return now - failed < FAILED_FETCH_PAUSE

    def _remember(self, memory: dict, key: Any, value: Any) -> None:
        """memory[key] = value, forgetting the oldest key beyond MEMORY (the session threads
        share it)."""
        with self._lock:
            memory.pop(key, None)
            memory[key] = value
            if len(memory) > MEMORY:
                del memory[next(iter(memory))]

    def _note_once(self, key: tuple[str, ...], text: str) -> None:
        """Log `text` the first time `key` comes, not once a message."""
        with self._lock:
            if key in self.noted:
                return
            if len(self.noted) >= MEMORY:
                self.noted.clear()
            self.noted.add(key)
        log.info("%s", text)

    def _cached(self, domain: str, now: float) -> Found | None:
        """The policy memory or the spool holds for `domain`, unless it has expired."""
        with self._lock:
            remembered, found = domain in self.known, self.known.get(domain)
        if not remembered:
            found = self.cache.load(domain, now)
            self._remember(self.known, domain, found)
        if found is not None and found.expires <= now:
            log.info("%s expired (fetched %s); dropped", found.describe(), _when(found.fetched))
            path = self.cache.path(domain)
            if path is not None:
                unlink_quietly(path)
            found = None
            self._remember(self.known, domain, None)
        if found is not None and found.source != CACHE:
            found = Found(found.domain, found.policy, found.policy_id, found.fetched, found.expires, CACHE)
        return found


def for_route(config: Config, domain: str, resolver: dns.resolver.Resolver) -> dict[str, Any]:
    """What `qrouter route --resolve` shows of `domain`'s policy: found as a worker finds it
    (the spool's cache read, never written), `shown` the line it prints."""
    policies = Policies(resolver, config.queue_dir, config.smtp_tls_ca or None, keep=False)
    found = policies.lookup(domain)
    if found is None:
        return {"mode": None, "shown": f"no policy for {domain} (none published, none fetched, none cached)"}
    where = (f"from the cache {policies.cache.path(found.domain)}" if found.source == CACHE
             else f"fetched from https://mta-sts.{found.domain}{WELL_KNOWN}")
    return {"mode": found.policy.mode, "mx": list(found.policy.mx), "max_age": found.policy.max_age,
            "id": found.policy_id, "source": found.source, "expires": found.expires,
            "shown": f"{found.policy.mode} policy of {domain}: mx {' '.join(found.policy.mx) or '(none)'}, "
                     f"max_age {found.policy.max_age}, id {found.policy_id} ({where}, expires {_when(found.expires)})"}


def fetch(domain: str, resolver: dns.resolver.Resolver, ca_file: str | None,
          timeout: float = FETCH_TIMEOUT) -> tuple[STSPolicy, str]:
    """The policy at https://mta-sts.DOMAIN/.well-known/mta-sts.txt, and its text. FetchError
    with the TLS report's result type when it cannot be had or is not valid."""
    host = f"mta-sts.{domain}"
    url = f"https://{host}{WELL_KNOWN}"
    try:
        addresses = resolve_host(host, resolver)
    except MXLookupError as exc:
        raise FetchError(STS_POLICY_FETCH_ERROR, f"{url}: {exc}") from None
    deadline = time.monotonic() + timeout
    failures = []
    for address in addresses:
        try:
            body = _get(address, host, ca_file, deadline)
        except urllib3.exceptions.SSLError as exc:
            raise FetchError(STS_WEBPKI_INVALID, f"{url} at {address}: TLS failed: {_reason(exc)}") from None
        except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError) as exc:
            failures.append(f"{address}: {_reason(exc)}")  # the next address may answer
            continue
        except urllib3.exceptions.HTTPError as exc:
            raise FetchError(STS_POLICY_FETCH_ERROR, f"{url} at {address}: {_reason(exc)}") from None
        try:
            text = body.decode("utf-8")
            return parse_policy(text, url), text
        except (UnicodeDecodeError, STSError) as exc:
            raise FetchError(STS_POLICY_INVALID, str(exc)) from None
    raise FetchError(STS_POLICY_FETCH_ERROR, f"{url}: cannot connect: {'; '.join(failures)}")


def _get(address: str, host: str, ca_file: str | None, deadline: float) -> bytes:
    """The body of the policy from the server at `address`, the certificate checked for `host`;
    FetchError for an answer that is not the policy, urllib3's errors for a failed connection."""
    left = max(deadline - time.monotonic(), 0.1)
    pool = urllib3.HTTPSConnectionPool(address, 443, timeout=urllib3.Timeout(connect=left, read=left),
                                       retries=False, cert_reqs="CERT_REQUIRED", ca_certs=ca_file,
                                       assert_hostname=host, server_hostname=host)
    url = f"https://{host}{WELL_KNOWN} at {address}"
    try:
        response = pool.urlopen("GET", WELL_KNOWN, headers={"Host": host}, redirect=False, retries=False,
                                assert_same_host=False, preload_content=False)
        try:
            if response.status != 200:
                where = response.headers.get("Location")
                said = f" (a redirect to {where}, which MTA-STS does not follow)" if where else ""
                raise FetchError(STS_POLICY_FETCH_ERROR, f"{url}: answered HTTP {response.status}{said}")
            media_type = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            if media_type != "text/plain":
                raise FetchError(STS_POLICY_INVALID,
                                 f"{url}: Content-Type {media_type or '(none)'!r}, not text/plain")
            body = b""
            while len(body) <= MAX_POLICY_BYTES:
                if time.monotonic() > deadline:
                    raise FetchError(STS_POLICY_FETCH_ERROR, f"{url}: the body took longer than the time allowed")
                chunk = response.read(4096)
                if not chunk:
                    return body
                body += chunk
            raise FetchError(STS_POLICY_INVALID, f"{url}: the policy is larger than {MAX_POLICY_BYTES} bytes")
        finally:
            response.release_conn()
    finally:
        pool.close()


def _reason(exc: BaseException) -> str:
    """urllib3's error without the pool and connection objects it puts before the cause."""
    text = str(exc.__cause__ or exc.__context__ or exc) if isinstance(exc, urllib3.exceptions.SSLError) else str(exc)
    return text.rpartition(": ")[2] if "object at 0x" in text else text


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp)) + " UTC"
