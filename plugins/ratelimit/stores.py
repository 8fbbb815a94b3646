"""Token buckets and concurrency slots, and the in-process store that keeps them.

Every caller has up to three allowances: a bucket of requests and a bucket of tokens,
each holding at most its per-minute limit and refilling continuously at limit/60 per
second, and a number of calls it may have running at once. A call takes one request
and a slot when it is admitted; its tokens are charged when it ends and its usage is
known, so the token bucket may go below zero (a debt later calls wait off).

A store does all of that in ``admit`` and ``finish``; the Redis store does the same in
one round trip each, so several Inferno processes share the allowances.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from inferno.kernel.errors import InfernoError

from .limits import Limits

SECONDS_PER_MINUTE = 60.0


class Refusal(Exception):
    """A call the caller's limits do not admit now.

    ``kind`` is ``requests``, ``tokens`` or ``concurrent``; ``limit`` its configured
    value; ``remaining`` what is left of it (0 when refused); ``reset`` the seconds until
    the bucket has room for one more (a slot has no schedule: a second, as a hint).
    """

    def __init__(self, kind: str, limit: int, remaining: int, reset: float) -> None:
        super().__init__(f"{kind} limit of {limit} reached")
        self.kind = kind
        self.limit = limit
        self.remaining = remaining
        self.reset = reset


class StorageUnavailable(InfernoError):
    """The store could not be asked (Redis down or too slow); ``on_storage_error``
    decides whether calls are refused or let through."""


class Store(Protocol):
    """Where buckets live: ``memory`` (one process) or ``redis`` (shared)."""

    async def admit(self, owner: str, limits: Limits) -> str:
        """Take one request and a slot for ``owner``, or raise :class:`Refusal` (nothing is
        taken then). Returns the lease to give back to :meth:`finish`."""

    async def finish(self, owner: str, limits: Limits, lease: str, tokens: int) -> None:
        """Give the slot back and charge ``tokens`` to the token bucket."""

    async def close(self) -> None:
        """Let go of connections and background tasks."""


class _Buckets:
    """One caller's state: two bucket levels, when each was last brought up to date, the
    calls it has running, and the limits it was last seen with."""

    __slots__ = ("active", "limits", "requests", "requests_at", "tokens", "tokens_at")

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.requests = float(limits.requests)
        self.tokens = float(limits.tokens)
        self.requests_at = self.tokens_at = now
        self.active = 0

    def full(self, now: float) -> bool:
        limits = self.limits
        return (refill(self.requests, self.requests_at, limits.requests, now)
                >= limits.requests
                and refill(self.tokens, self.tokens_at, limits.tokens, now) >= limits.tokens)


def refill(level: float, at: float, limit: int, now: float) -> float:
    """The level of a bucket of ``limit`` per minute that held ``level`` at ``at``."""
    if level >= limit:
        return float(limit)
    return min(float(limit), level + (now - at) * limit / SECONDS_PER_MINUTE)


def seconds_until_room(level: float, limit: int) -> float:
    """Seconds until a bucket at ``level`` holds one whole unit again."""
    return max(0.0, (1.0 - level) * SECONDS_PER_MINUTE / limit)


class MemoryStore:
    """Buckets in a dictionary of this process, for a single Inferno (the edge).

    Nothing awaits between reading and writing a bucket, so each call is atomic on the
    event loop without a lock. The dictionary is kept in least-recently-used order and
    bounded: past ``max_callers`` it forgets callers with no call running, those whose
    buckets are full first (they carry nothing a fresh bucket would not), then the
    longest idle, so a flood of addresses cannot grow it without limit.
    """

    def __init__(self, *, max_callers: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_callers = max_callers
        self.clock = clock
        self._callers: dict[str, _Buckets] = {}

    def __len__(self) -> int:
        return len(self._callers)

    async def admit(self, owner: str, limits: Limits) -> str:
        now = self.clock()
        callers = self._callers
        state = callers.pop(owner, None)
        if state is None:
            if len(callers) >= self.max_callers:
                self._forget(now)
            state = _Buckets(limits, now)
        callers[owner] = state  # most recently used last
        state.limits = limits
        if limits.concurrent and state.active >= limits.concurrent:
            raise Refusal("concurrent", limits.concurrent, 0, 1.0)
        if limits.tokens:
            level = state.tokens = refill(state.tokens, state.tokens_at, limits.tokens, now)
            state.tokens_at = now
            if level < 1:
                raise Refusal("tokens", limits.tokens, 0,
                              seconds_until_room(level, limits.tokens))
        if limits.requests:
            level = refill(state.requests, state.requests_at, limits.requests, now)
            state.requests_at = now
            if level < 1:
                state.requests = level
                raise Refusal("requests", limits.requests, 0,
                              seconds_until_room(level, limits.requests))
            state.requests = level - 1
        state.active += 1
        return ""

    async def finish(self, owner: str, limits: Limits, lease: str, tokens: int) -> None:
        state = self._callers.get(owner)
        if state is None:  # never forgotten while a call runs; defensive all the same
            return
        state.active = max(0, state.active - 1)
        if tokens > 0 and limits.tokens:
            now = self.clock()
            state.tokens = refill(state.tokens, state.tokens_at, limits.tokens, now) - tokens
            state.tokens_at = now

    async def close(self) -> None:
        self._callers.clear()

    def remaining(self, owner: str) -> tuple[float, float, int] | None:
        """``(requests, tokens, running)`` of ``owner`` now, or ``None`` when not tracked."""
        state = self._callers.get(owner)
        if state is None:
            return None
        now, limits = self.clock(), state.limits
        return (refill(state.requests, state.requests_at, limits.requests, now),
                refill(state.tokens, state.tokens_at, limits.tokens, now), state.active)

    def _forget(self, now: float) -> None:
        """Bring the dictionary down to nine tenths of its bound, so that the next sweep
        is at least a tenth of the bound of new callers away."""
        target = self.max_callers * 9 // 10
        callers = self._callers
        idle = [owner for owner, state in callers.items() if state.active == 0]
        for owner in idle:
            if callers[owner].full(now):
                del callers[owner]
        for owner in idle:
            if len(callers) <= target:
                break
            callers.pop(owner, None)
