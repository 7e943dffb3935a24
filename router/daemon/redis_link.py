"""The cluster's one conversation with Redis (`cluster-redis`), on a thread of its own.

The supervisor's loop hands out all mail and must never wait for a network peer, so it never
calls Redis: it leaves a `Request` here (what its destinations need of the shared state) and goes
on; this thread makes one round trip of it (a pipeline of Lua scripts and plain commands), puts
the `Answer` where the loop finds it and writes a byte to a pipe the loop's selector watches.
Every call has a timeout of CALL_SECONDS, so a Redis that is slow or gone turns into an Answer
with an error, after which the loop falls back to local limits (router/daemon/cluster.py).

The thread holds no lock a forked worker could need: its queue and the client's connection are
its own; a worker closes the pipe (`fds`) and lets go of the client's connection, as the cluster
view's publisher does (router/daemon/cluster_view.py, whose `connect` this uses).

What is kept in Redis, per destination NAME (all under PREFIX):
- `lease:NAME`: a sorted set of leases, one per connection a node has or is about to open,
  members `NODE#i`, scored by when they expire (ms, Redis's clock). A node renews its own on
  every exchange; the leases of a node that died expire by themselves. One given back counts for
  GIVEN_BACK_MS more, since the server may not have seen its connection's end yet when the next
  node opens one.
- `demand:NAME`: what each node would use there now (a hash, node -> connections and until when
  it is believed, LEASE_MS after it was said). The limit's fair shares come from it: divided
  among the nodes that want it, a node wanting less than its share leaving the rest to the
  others, the remainder going to the first nodes by name. While a node wants more than it holds
  (it was refused), and for CONTENDED_MS after, every node may take new leases only up to its
  share (`allowed`), and one holding more gives them back as its connections finish their
  messages; otherwise a node may take whatever is free. The holders of leases also close their
  idle connections there then, so the room goes to mail waiting elsewhere.
- `wanted:NAME`: the last node that wanted more there than it held, for CONTENDED_MS: a node
  whose demand dips for a moment (its waiting mail all handed out) does not let the others take
  more than their shares, only to give it back a moment later, closing connections for nothing.
- `tokens:NAME`: the token bucket of its rate (a hash of tokens and the time they were counted).
- `dead:NAME`: found unreachable by a node, until when and why (JSON).
- `probe:NAME`: the node that probes it now (SET NX, with a time-to-live).
And `nodes`: a sorted set of the nodes seen, scored by when they are no longer believed to live;
their names in order give each node its share of the limits while Redis does not answer.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import redis

from router.daemon.cluster_view import connect

PREFIX = "qrouter:"
CALL_SECONDS = 1.0  # connect and socket timeout of every call: then Redis counts as unreachable
LEASE_MS = 10_000  # a lease not renewed for this long is given back (its node died)
NODE_MS = 10_000  # a node not heard of for this long is no longer counted
GIVEN_BACK_MS = 300  # a lease given back counts this much longer: its connection may still be closing
CONTENDED_MS = 2_000  # a node wanting more than it holds keeps the others to their shares this long at least
TOKEN_SECONDS = 0.5  # a rate's bucket holds this many seconds of tokens (at least one)

LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node, hold, limit, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local demand, grace = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held, missing = 0, {}
for i = 0, math.max(limit, hold) - 1 do
  local member = node .. '#' .. i
  if i < hold then
    if redis.call('ZSCORE', KEYS[1], member) then
      redis.call('ZADD', KEYS[1], now + ttl, member)
      held = held + 1
    else
      missing[#missing + 1] = member
    end
  else
    local expiry = redis.call('ZSCORE', KEYS[1], member)
    if expiry and tonumber(expiry) > now + grace then
      redis.call('ZADD', KEYS[1], now + grace, member)
    end
  end
end
if demand > 0 then
  redis.call('HSET', KEYS[2], node, demand .. ':' .. (now + ttl))
else
  redis.call('HDEL', KEYS[2], node)
end
local wants, names, pairs_ = {}, {}, redis.call('HGETALL', KEYS[2])
for i = 1, #pairs_, 2 do
  local want, expiry = string.match(pairs_[i + 1], '^(%d+):(%d+)$')
  if expiry and tonumber(expiry) > now then
    wants[pairs_[i]] = tonumber(want)
    names[#names + 1] = pairs_[i]
  else
    redis.call('HDEL', KEYS[2], pairs_[i])
  end
end
local holds = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now + grace), '+inf')) do
  local owner = string.match(member, '^(.*)#%d+$')
  holds[owner] = (holds[owner] or 0) + 1
end
table.sort(names, function(a, b) if wants[a] ~= wants[b] then return wants[a] < wants[b] end return a < b end)
local share, left, i = {}, limit, 1
while i <= #names do
  local rest = #names - i + 1
  local even = math.floor(left / rest)
  if wants[names[i]] <= even then
    share[names[i]] = wants[names[i]]
    left = left - wants[names[i]]
    i = i + 1
  else
    local tail = {}
    for j = i, #names do tail[#tail + 1] = names[j] end
    table.sort(tail)
    for j, name in ipairs(tail) do share[name] = even + ((j <= left - even * rest) and 1 or 0) end
    break
  end
end
local wanted = redis.call('GET', KEYS[3])
local contended = (wanted and wanted ~= node) and 1 or 0
for _, name in ipairs(names) do
  if name ~= node and wants[name] > (holds[name] or 0) then contended = 1 end
end
local allowed = (contended == 1) and (share[node] or 0) or limit
local total = redis.call('ZCARD', KEYS[1])
for _, member in ipairs(missing) do
  if total >= limit or held >= allowed then break end
  redis.call('ZADD', KEYS[1], now + ttl, member)
  held, total = held + 1, total + 1
end
if total > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
if #names > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
if held < demand then redis.call('SET', KEYS[3], node, 'PX', ARGV[7]) end
return {held, allowed, contended}
"""

TOKEN_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or burst
local at = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local grant = math.min(want, math.floor(tokens))
tokens = tokens - grant
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return grant
"""

NODE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

SCRIPTS = {"lease": LEASE_SCRIPT, "tokens": TOKEN_SCRIPT, "node": NODE_SCRIPT}


@dataclass(frozen=True)
class Want:
    """What one destination needs of the shared state."""

    limit: int  # its concurrency limit
    leases: int  # leases to hold: connections this node has there, and those it would open and may
    rate: float | None = None  # messages per second over the cluster
    tokens: int = 0  # starts this node would make now
    demand: int = 0  # connections it would use there now (its fair share counts this)


@dataclass
class Request:
    wants: dict[str, Want]
    dead: dict[str, tuple[float, str]] = field(default_factory=dict)  # found dead here: until when, why
    alive: list[str] = field(default_factory=list)  # revived here (a probe reached it)
    claim: list[str] = field(default_factory=list)  # dead, its probe due: this node would probe
    watch: dict[str, float] = field(default_factory=dict)  # whose shared dead state to read -> local dead until
    probe_seconds: float = 60.0


@dataclass
class Answer:
    error: str = ""  # why Redis did not answer; "" when it did
    nodes: int = 0
    rank: int = 0  # this node's place among the nodes seen, by name
    leases: dict[str, int] = field(default_factory=dict)
    allowed: dict[str, int] = field(default_factory=dict)  # leases it may hold: its fair share, or the limit
    contended: set[str] = field(default_factory=set)  # another node wants more there than it holds
    tokens: dict[str, int] = field(default_factory=dict)
    dead: dict[str, tuple[float, str, str] | None] = field(default_factory=dict)  # until, why, by which node
    probes: dict[str, tuple[str, float]] = field(default_factory=dict)  # who probes, for how many more seconds


def key(kind: str, name: str) -> str:
    return f"{PREFIX}{kind}:{name}"


class RedisLink:
    """The thread that talks to Redis for the supervisor: one request at a time."""

    def __init__(self, url: str, node: str) -> None:
        self.node = node
        self.client = connect(url, CALL_SECONDS)
        os.register_at_fork(after_in_child=self.client.connection_pool.reset)  # a worker lets go of it
        self.shas: dict[str, str] = {}
        self.round_trips = 0
        self.inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self.answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._serve, name="cluster-redis", daemon=True)
        self.thread.start()

    def fds(self) -> list[int]:
        return [self.wake_read, self.wake_write]

    def send(self, request: Request) -> None:
        self.inbox.put(request)

    def take(self) -> list[Answer]:
        """The answers that came in (the loop calls this when the pipe is readable)."""
        try:
            while os.read(self.wake_read, 512):
                pass
        except BlockingIOError:
            pass
        answers = []
        while not self.answers.empty():
            answers.append(self.answers.get())
        return answers

    def close(self, last: Request | None, timeout: float) -> None:
        """Stop the thread after one last request (giving back this node's leases), waiting at
        most `timeout` seconds: a Redis that does not answer lets the leases expire instead."""
        if last is not None:
            self.inbox.put(last)
        self.inbox.put(None)
        self.thread.join(timeout)
        for fd in self.fds():
            os.close(fd)

    def _serve(self) -> None:
        while (request := self.inbox.get()) is not None:
            try:
                answer = self._exchange(request)
            except (redis.RedisError, OSError, ValueError) as exc:
                answer = Answer(error=str(exc) or type(exc).__name__)
            self.answers.put(answer)
            try:
                os.write(self.wake_write, b"!")
            except BlockingIOError:  # full: the loop has been told already
                pass

    def _exchange(self, request: Request) -> Answer:
        if not self.shas:
            self._load_scripts()
        try:
            return self._round_trip(request)
        except redis.exceptions.NoScriptError:  # Redis restarted since the scripts were loaded
            self._load_scripts()
            return self._round_trip(request)

    def _load_scripts(self) -> None:
        self.shas = {name: self.client.script_load(text) for name, text in SCRIPTS.items()}
        self.round_trips += len(SCRIPTS)

    def _round_trip(self, request: Request) -> Answer:
        """Everything the request asks, in one pipeline: one round trip."""
        pipe = self.client.pipeline(transaction=False)
        node, probe_ms = self.node, max(1000, int(request.probe_seconds * 1000))
        pipe.evalsha(self.shas["node"], 1, key("nodes", "all"), node, NODE_MS)
        for name, want in request.wants.items():
            pipe.evalsha(self.shas["lease"], 3, key("lease", name), key("demand", name), key("wanted", name), node,
                         want.leases, want.limit, LEASE_MS, want.demand, GIVEN_BACK_MS, CONTENDED_MS)
        rated = [(name, want) for name, want in request.wants.items() if want.rate and want.tokens]
        for name, want in rated:
            assert want.rate is not None
            pipe.evalsha(self.shas["tokens"], 1, key("tokens", name), want.rate,
                         max(1.0, want.rate * TOKEN_SECONDS), want.tokens)
        for name, (until, why) in request.dead.items():
            pipe.set(key("dead", name), json.dumps({"until": until, "error": why, "node": node}),
                     px=max(1000, int((until - time.time()) * 1000) + 2 * probe_ms))
            pipe.delete(key("probe", name))
        for name in request.alive:
            pipe.delete(key("dead", name), key("probe", name))
        for name in request.claim:
            pipe.set(key("probe", name), node, nx=True, px=probe_ms)
        read = list(dict.fromkeys([*request.watch, *request.claim]))
        for name in read:
            pipe.get(key("dead", name))
            pipe.get(key("probe", name))
            pipe.pttl(key("probe", name))
        results = pipe.execute(raise_on_error=False)
        self.round_trips += 1
        for result in results:
            if isinstance(result, Exception):
                raise result
        names = sorted(member.decode() for member in results[0])
        answer = Answer(nodes=len(names), rank=names.index(node))
        at = 1
        for name in request.wants:
            held, allowed, contended = results[at]
            answer.leases[name] = int(held)
            answer.allowed[name] = int(allowed)
            if contended:
                answer.contended.add(name)
            at += 1
        for name, _ in rated:
            answer.tokens[name] = int(results[at])
            at += 1
        at += 2 * len(request.dead) + len(request.alive) + len(request.claim)
        for name in read:
            dead, prober, left = results[at:at + 3]
            at += 3
            if dead is None:
                answer.dead[name] = None
            else:
                record = json.loads(dead)
                answer.dead[name] = (float(record["until"]), str(record["error"]), str(record["node"]))
            if prober is not None:
                answer.probes[name] = (prober.decode(), max(0, int(left)) / 1000)
        return answer
