"""Buckets in Redis, shared by every Inferno process that names the same server and prefix.

Each check is one ``EVALSHA`` of a Lua script, so reading, refilling and taking happen
atomically on the server whichever process asks. The clock is Redis's own (``TIME``),
so processes on machines whose clocks disagree still refill alike.

Keys, per caller (the braces keep both in one Redis Cluster slot)::

    <prefix>{<caller>}          hash: r, r_at (requests), t, t_at (tokens)
    <prefix>{<caller>}:leases   sorted set: one member per running call, scored by expiry

Both expire once their buckets would be full again or their leases ran out, so an idle
caller costs nothing. A running call's slot is a lease: while the call runs, its process
pushes the expiry forward every third of ``lease_seconds``; a process that is killed
stops doing so and its slots free themselves within ``lease_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from inferno.kernel.logs import get_logger

from .limits import Limits
from .stores import Refusal, StorageUnavailable

log = get_logger("rate_limits")
#: What a Redis call raises when the server cannot answer (OSError: refused, timed out).
_FAILURES = (RedisError, OSError)

_PRELUDE = """
local now = tonumber(ARGV[1])
if not now then
  local time = redis.call('TIME')
  now = tonumber(time[1]) + tonumber(time[2]) / 1000000
end
local function level(name, limit)
  local saved = redis.call('HMGET', KEYS[1], name, name .. '_at')
  local value, at = tonumber(saved[1]), tonumber(saved[2])
  if value == nil or at == nil then return limit end
  return math.min(limit, value + math.max(0, now - at) * limit / 60)
end
"""

#: KEYS: buckets, leases. ARGV: now, requests/min, tokens/min, slots, lease, lease seconds.
#: Returns {kind, limit, remaining, reset}; kind is '' when admitted.
ADMIT = _PRELUDE + """
local rpm, tpm, slots = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease_seconds = tonumber(ARGV[6])
if slots > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= slots then
    return {'concurrent', slots, 0, '1'}
  end
end
local tokens = tpm
if tpm > 0 then
  tokens = level('t', tpm)
  if tokens < 1 then
    return {'tokens', tpm, 0, tostring((1 - tokens) * 60 / tpm)}
  end
end
if rpm > 0 then
  local requests = level('r', rpm)
  if requests < 1 then
    return {'requests', rpm, 0, tostring((1 - requests) * 60 / rpm)}
  end
  requests = requests - 1
  redis.call('HSET', KEYS[1], 'r', tostring(requests), 'r_at', tostring(now))
  local idle = (rpm - requests) * 60 / rpm
  if tpm > 0 then idle = math.max(idle, (tpm - tokens) * 60 / tpm) end
  redis.call('EXPIRE', KEYS[1], math.ceil(idle) + 1)
end
if slots > 0 then
  redis.call('ZADD', KEYS[2], now + lease_seconds, ARGV[5])
  redis.call('EXPIRE', KEYS[2], math.ceil(lease_seconds) + 1)
end
return {'', 0, 0, '0'}
"""

#: KEYS: buckets, leases. ARGV: now, tokens/min, tokens spent, lease ('' for none).
FINISH = _PRELUDE + """
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[2], ARGV[4]) end
local tpm, spent = tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 and spent > 0 then
  local tokens = level('t', tpm) - spent
  redis.call('HSET', KEYS[1], 't', tostring(tokens), 't_at', tostring(now))
  local idle = math.ceil((tpm - tokens) * 60 / tpm) + 1
  if redis.call('TTL', KEYS[1]) < idle then redis.call('EXPIRE', KEYS[1], idle) end
end
return 1
"""

#: KEYS: leases. ARGV: now, lease seconds, the leases still running. Only existing leases
#: are moved, and only forward.
REFRESH = _PRELUDE + """
local lease_seconds = tonumber(ARGV[2])
local moved = 0
for index = 3, #ARGV do
  moved = moved + redis.call('ZADD', KEYS[1], 'XX', 'GT', 'CH', now + lease_seconds,
                             ARGV[index])
end
redis.call('EXPIRE', KEYS[1], math.ceil(lease_seconds) + 1)
return moved
"""


class RedisStore:
    """The ``redis`` store: atomic checks shared by every process using ``prefix``.

    ``clock`` replaces Redis's ``TIME`` (for tests that move time by hand).
    """

    def __init__(self, url: str, *, prefix: str = "inferno:rl:", lease_seconds: float = 60.0,
                 timeout: float = 0.5, clock: Callable[[], float] | None = None) -> None:
        self.where = redacted_url(url)
        self.prefix = prefix
        self.lease_seconds = float(lease_seconds)
        self.clock = clock
        #: One retry, at once: a pooled connection Redis closed is replaced; a server that
        #: is down is reported within ``timeout``, not after a backoff.
        self.client: Any = Redis.from_url(url, socket_timeout=timeout,
                                          socket_connect_timeout=timeout,
                                          retry=Retry(NoBackoff(), 1))
        self._admit = self.client.register_script(ADMIT)
        self._finish = self.client.register_script(FINISH)
        self._refresh = self.client.register_script(REFRESH)
        self._process = uuid.uuid4().hex[:12]
        self._numbers = itertools.count()
        #: The leases of this process's running calls: lease → its sorted set.
        self._leases: dict[str, str] = {}
        self._refresher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r}, prefix={self.prefix!r})"

    def keys(self, owner: str) -> tuple[str, str]:
        buckets = f"{self.prefix}{{{owner}}}"
        return buckets, buckets + ":leases"

    async def admit(self, owner: str, limits: Limits) -> str:
        lease = f"{self._process}:{next(self._numbers)}" if limits.concurrent else ""
        buckets, leases = self.keys(owner)
        try:
            kind, limit, remaining, reset = await self._admit(
                keys=[buckets, leases],
                args=[self._now(), limits.requests, limits.tokens, limits.concurrent, lease,
                      self.lease_seconds])
        except _FAILURES as exc:
            raise self._unavailable(exc) from None
        if kind:
            raise Refusal(kind.decode(), int(limit), int(remaining), float(reset))
        if lease:
            self._leases[lease] = leases
            if self._refresher is None:
                self._refresher = asyncio.get_running_loop().create_task(
                    self._refresh_forever(), name="rate-limit-leases")
        return lease

    async def finish(self, owner: str, limits: Limits, lease: str, tokens: int) -> None:
        self._leases.pop(lease, None)  # even if Redis cannot be told: it expires then
        buckets, leases = self.keys(owner)
        try:
            await self._finish(keys=[buckets, leases],
                               args=[self._now(), limits.tokens, max(0, tokens), lease])
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    async def refresh(self) -> int:
        """Push the expiry of this process's running calls forward (one round trip for
        all of them); returns how many leases were moved."""
        by_set: dict[str, list[str]] = {}
        for lease, leases in list(self._leases.items()):
            by_set.setdefault(leases, []).append(lease)
        if not by_set:
            return 0
        try:
            pipe = self.client.pipeline(transaction=False)
            for leases, running in by_set.items():
                await self._refresh(keys=[leases],
                                    args=[self._now(), self.lease_seconds, *running],
                                    client=pipe)
            return sum(int(moved) for moved in await pipe.execute())
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await self.client.aclose()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.refresh()
            except StorageUnavailable as exc:
                log.warning("could not extend the leases of running calls", error=str(exc))

    def _now(self) -> str:
        return "" if self.clock is None else repr(float(self.clock()))

    def _unavailable(self, exc: BaseException) -> StorageUnavailable:
        return StorageUnavailable(f"rate limit storage {self.where} unavailable: "
                                  f"{type(exc).__name__}: {exc}")


def redacted_url(url: str) -> str:
    """``scheme://host:port/db`` of a Redis URL: never its user name or password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "redis (unparsable URL)"
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return f"{parts.scheme}://{host}{port}{parts.path}"
