"""Per-model queues: a bounded number of requests wait, a bounded time, in arrival order
within a priority (a caller's roles give it one: ``plugins.gateway.priorities``).

A model runs ``concurrency`` requests at once. Up to ``limit`` more wait for a turn;
one more is refused at once (503 with ``Retry-After``) rather than left to wait
without end, and a request that waited ``timeout`` seconds is refused the same way.
Queue waits are measured (``wait_seconds`` totals and the last wait per model).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError


@dataclass
class ModelQueue:
    model: str
    concurrency: int
    limit: int
    running: int = 0
    #: Highest priority first, arrival order within one.
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    priority: dict[asyncio.Future[None], int] = field(default_factory=dict)
    served: int = 0
    refused: int = 0
    wait_seconds: float = 0.0
    last_wait: float = 0.0

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting, "limit": self.limit,
                "concurrency": self.concurrency, "served": self.served,
                "refused": self.refused, "wait_seconds_total": round(self.wait_seconds, 6),
                "last_wait_seconds": round(self.last_wait, 6)}


class Ticket:
    """A place in a model's queue, taken when the request is accepted."""

    def __init__(self, queues: Queues, queue: ModelQueue, priority: int = 0) -> None:
        self.queues = queues
        self.queue = queue
        self.waited = 0.0
        self._active = False
        self._released = False
        self._future: asyncio.Future[None] | None = None
        if queue.running < queue.concurrency and not queue.waiters:
            queue.running += 1
            self._active = True
        else:
            self._future = asyncio.get_running_loop().create_future()
            place = len(queue.waiters)  # behind every waiter of this priority or higher
            while place and queue.priority[queue.waiters[place - 1]] < priority:
                place -= 1
            queue.waiters.insert(place, self._future)
            queue.priority[self._future] = priority

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[float]:
        """Wait for this request's turn (seconds waited as the value), then hold it."""
        started = time.perf_counter()
        try:
            if not self._active:
                assert self._future is not None
                try:
                    await asyncio.wait_for(asyncio.shield(self._future), self.queues.timeout)
                except TimeoutError:
                    self.queue.refused += 1
                    raise ApiError(503, f"model {self.queue.model!r} is busy: this request "
                                        f"waited {self.queues.timeout:g} s for its turn; try "
                                        f"again later", code="queue_timeout",
                                   retry_after=self.queues.retry_after) from None
                self._active = True
            self.waited = time.perf_counter() - started
            self.queue.last_wait = self.waited
            self.queue.wait_seconds += self.waited
            yield self.waited
        finally:
            self.release()

    def release(self) -> None:
        """Give the turn (or the place in line) back; safe to call more than once."""
        if self._released:
            return
        self._released = True
        queue = self.queue
        if self._active:
            queue.served += 1
            queue.running -= 1
            self.queues.wake(queue)
        elif self._future is not None:
            if self._future in queue.waiters:
                queue.waiters.remove(self._future)
                queue.priority.pop(self._future, None)
            if self._future.done() and not self._future.cancelled():
                queue.running -= 1  # handed a turn it will not use: pass it on
                self.queues.wake(queue)
            else:
                self._future.cancel()


class Queues:
    def __init__(self, *, concurrency: int, limit: int, timeout: float,
                 retry_after: float) -> None:
        self.concurrency = concurrency
        self.limit = limit
        self.timeout = timeout
        self.retry_after = retry_after
        self.models: dict[str, ModelQueue] = {}

    def enter(self, model: str, priority: int = 0) -> Ticket:
        """A ticket for ``model``'s queue, or ``ApiError`` 503 when the queue is full (a
        higher priority takes a turn first, never another's place in a full queue)."""
        queue = self.models.get(model)
        if queue is None:
            queue = self.models[model] = ModelQueue(model, self.concurrency, self.limit)
        if queue.running >= queue.concurrency and queue.waiting >= queue.limit:
            queue.refused += 1
            raise ApiError(503, f"model {model!r} is busy: {queue.running} running and "
                                f"{queue.waiting} waiting, the most this server queues; try "
                                f"again later", code="queue_full", retry_after=self.retry_after)
        return Ticket(self, queue, priority)

    def resize(self, model: str, concurrency: int) -> None:
        """Serve ``concurrency`` requests of ``model`` at once from now on (a loaded model
        says how many it batches); waiting requests take the new turns at once."""
        queue = self.models.get(model)
        if queue is not None and queue.concurrency != concurrency:
            queue.concurrency = concurrency
            self.wake(queue)

    def wake(self, queue: ModelQueue) -> None:
        while queue.waiters and queue.running < queue.concurrency:
            future = queue.waiters.pop(0)
            queue.priority.pop(future, None)
            if not future.done():
                queue.running += 1
                future.set_result(None)

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: queue.stats() for name, queue in sorted(self.models.items())}
