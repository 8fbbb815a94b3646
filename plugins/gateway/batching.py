"""Embedding requests for one model, gathered into one backend call while they wait.

A batch is opened by the first request that finds no open batch. Those that arrive
together, or while the model is busy, join it (up to ``limit`` inputs), and it runs as
one ``embed_counted`` call: one trip to the backend's worker thread and one set of
session runs instead of one each. The batch holds a single place in the model's queue.
When its turn comes, a batch younger than ``window`` seconds waits out the rest of the
window for companions, unless it is already full or the model's previous batch held a
single request: clients that send again as soon as they are answered arrive a little
apart, and without the window the first of them would run alone and leave the rest to
wait a whole run for the next batch, while a lone client would only be slowed by it.
If a batch fails, its requests run again one by one, so that one bad input fails only
its own request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .queues import Queues, Ticket


@dataclass(frozen=True)
class Embedded:
    """One request's share of a batch."""

    vectors: list[list[float]]
    tokens: int | None
    waited: float
    batch_size: int


@dataclass
class _Batch:
    ticket: Ticket
    requests: list[tuple[list[str], float | None, asyncio.Future[Embedded]]] = field(
        default_factory=list)
    inputs: int = 0
    started: bool = False
    opened: float = field(default_factory=time.perf_counter)
    #: Set once the batch holds ``limit`` inputs: it stops waiting for companions.
    full: asyncio.Event = field(default_factory=asyncio.Event)


#: ``use(model, keep_alive)`` → an async context manager yielding the loaded model.
Use = Callable[[str, float | None], Any]


class EmbeddingBatcher:
    def __init__(self, queues: Queues, use: Use, limit: int, window: float = 0.0) -> None:
        self.queues = queues
        self.use = use
        self.limit = limit
        self.window = window
        self._waiting: dict[str, _Batch] = {}
        #: Requests in each model's latest batch: more than one means clients are concurrent.
        self._latest: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self, timeout: float = 10.0) -> None:
        """Let running batches finish (bounded), then cancel what is left."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def embed(self, model: str, inputs: Sequence[str], keep_alive: float | None
                    ) -> Embedded:
        """``inputs`` embedded by ``model``, alone or in a batch; ``ApiError`` (503) when the
        model's queue is full."""
        batch = self._waiting.get(model)
        if batch is None or batch.started or batch.inputs + len(inputs) > self.limit:
            batch = _Batch(self.queues.enter(model))  # a full queue refuses here
            self._waiting[model] = batch
            task = asyncio.ensure_future(self._run(model, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        future: asyncio.Future[Embedded] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # its caller may have left: nobody else reads it
        batch.requests.append((list(inputs), keep_alive, future))
        batch.inputs += len(inputs)
        if batch.inputs >= self.limit:
            batch.full.set()
        return await asyncio.shield(future)  # a caller that leaves does not cancel the batch

    async def _run(self, model: str, batch: _Batch) -> None:
        try:
            async with batch.ticket.turn() as queued:
                waited = queued + await self._gather(model, batch)
                batch.started = True
                self._latest[model] = len(batch.requests)
                if self._waiting.get(model) is batch:
                    del self._waiting[model]
                keep_alive = next((k for _, k, _ in reversed(batch.requests) if k is not None),
                                  None)
                async with self.use(model, keep_alive) as loaded:
                    await self._embed(loaded, batch, waited)
        except BaseException as exc:
            for _, _, future in batch.requests:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            batch.ticket.release()

    async def _gather(self, model: str, batch: _Batch) -> float:
        """Hold the turn until the batch is ``window`` seconds old or full; the seconds it
        held. A batch that waited in the queue that long, or follows a batch of one request
        (a lone client, who would wait for nobody), runs at once."""
        started = time.perf_counter()
        left = self.window - (started - batch.opened)
        if left <= 0 or batch.full.is_set() or self._latest.get(model, 0) <= 1:
            return 0.0
        with contextlib.suppress(TimeoutError):  # the window ended before the batch filled
            await asyncio.wait_for(batch.full.wait(), left)
        return time.perf_counter() - started

    async def _embed(self, loaded: Any, batch: _Batch, waited: float) -> None:
        requests = batch.requests
        try:
            vectors, counts = await loaded.embed_counted(
                [text for inputs, _, _ in requests for text in inputs])
        except Exception:
            if len(requests) == 1:
                raise
            await _one_by_one(loaded, requests, waited)
            return
        start = 0
        for inputs, _, future in requests:
            end = start + len(inputs)
            tokens = sum(counts[start:end]) if counts is not None else None
            if not future.done():
                future.set_result(Embedded(vectors[start:end], tokens, waited, len(requests)))
            start = end


def _retrieved(future: asyncio.Future[Embedded]) -> None:
    if not future.cancelled():
        future.exception()


async def _one_by_one(loaded: Any, requests: Sequence[tuple[list[str], Any, Any]],
                      waited: float) -> None:
    started = time.perf_counter()
    for inputs, _, future in requests:
        try:
            vectors, counts = await loaded.embed_counted(inputs)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            continue
        tokens = sum(counts) if counts is not None else None
        if not future.done():
            future.set_result(Embedded(vectors, tokens, waited + time.perf_counter() - started,
                                       1))

