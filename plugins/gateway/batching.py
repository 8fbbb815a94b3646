"""Embedding requests for one model, gathered into one backend call while they wait.

Requests never wait to be batched: a batch starts as soon as the model is free. Those
that arrive together, or while the model is busy, join the batch waiting for the next
turn (up to ``limit`` inputs), and it runs as one ``embed_counted`` call: one trip to the
backend's worker thread and one session run instead of one each. The batch holds a
single place in the model's queue. If a batch fails, its requests run again one by one,
so that one bad input fails only its own request.
"""

from __future__ import annotations

import asyncio
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


#: ``use(model, keep_alive)`` → an async context manager yielding the loaded model.
Use = Callable[[str, float | None], Any]


class EmbeddingBatcher:
    def __init__(self, queues: Queues, use: Use, limit: int) -> None:
        self.queues = queues
        self.use = use
        self.limit = limit
        self._waiting: dict[str, _Batch] = {}
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
        return await asyncio.shield(future)  # a caller that leaves does not cancel the batch

    async def _run(self, model: str, batch: _Batch) -> None:
        try:
            async with batch.ticket.turn() as waited:
                batch.started = True
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

