"""The gateway middleware that answers from the cache (order 400, after rate limits).

For ``chat``, ``completion`` and ``embeddings`` only. A call is cacheable when it is
deterministic (temperature 0 or a fixed seed; embeddings always) unless
``deterministic_only`` is off, and when it does not ask otherwise: ``"cache": false`` or
``"no-store"`` in the body, or ``Cache-Control: no-store``, bypass the cache;
``"cache": "refresh"`` or ``Cache-Control: no-cache`` run the model and store the new
answer. Each call is told ``hit``, ``miss`` or ``bypass`` in ``call.meta["cache"]``.

Identical calls at once run the model once: the first (the leader) registers its key as in
flight before any await, the others (followers) wait for its record and are told ``hit``.
A follower whose leader failed or was dropped by its client tries again, becoming a
leader itself when nobody else is: an error is never shared, and never cached.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Mapping
from typing import Any

import structlog

from inferno.plugins.gateway.calls import Call, Delta, Final, Handler, StreamReply, ValueReply

from .keys import OPERATIONS, Identities, describe, deterministic_with, make_key
from .records import Record, Recorder
from .service import Flight, ResponseCache

USE, NO_STORE, REFRESH = "use", "no-store", "refresh"
#: What the body's ``cache`` field may say, and what it means.
BODY_MODES: dict[Any, str] = {True: USE, False: NO_STORE, NO_STORE: NO_STORE,
                              REFRESH: REFRESH}


def request_mode(call: Call) -> str | None:
    """``use``, ``no-store`` or ``refresh``; ``None`` for a ``cache`` value the gateway
    will refuse (it names the field)."""
    value = call.body.get("cache", True)
    mode = BODY_MODES.get(value) if isinstance(value, bool | str) else None
    if mode is None:
        return None
    directives = {d.strip().lower() for d in
                  call.credentials.headers.get("cache-control", "").split(",")}
    if "no-store" in directives:
        return NO_STORE
    if "no-cache" in directives and mode == USE:
        return REFRESH
    return mode


class CacheMiddleware:
    """Looks up, deduplicates and stores; ``kernel.service("cache")`` holds the state."""

    order = 400
    name = "cache"

    def __init__(self, cache: ResponseCache, *, deterministic_only: bool,
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self.cache = cache
        self.deterministic_only = deterministic_only
        self.identities = Identities(lambda: self.models)
        self.log = log

    @property
    def models(self) -> Any:
        return self.cache.kernel.service("models")

    async def __call__(self, call: Call, handler: Handler) -> Any:
        if call.operation not in OPERATIONS or not isinstance(call.body, Mapping):
            return await handler(call)
        mode = request_mode(call)
        if mode is None:
            return await handler(call)
        if isinstance(call.body.get("cache"), str):  # the gateway's bodies take a boolean
            call.body = {**call.body, "cache": mode != NO_STORE}
        try:
            request = describe(call.operation, call.body)
            entry = self.models.entry(request.model)
        except Exception:  # a body or model the gateway refuses, naming what is wrong
            return await handler(call)
        if entry.unavailable:
            return await handler(call)
        if mode == NO_STORE or (self.deterministic_only
                                and not deterministic_with(request, entry.parameters)):
            return await self._bypass(call, handler)
        try:
            identity = await self.identities.of(entry)
        except Exception as exc:  # unreadable, or changed while hashed: the gateway reports
            self.log.warning("model file not hashed: not cached", model=entry.name,
                             error=str(exc))
            return await self._bypass(call, handler)
        key = make_key(entry.name, {"model": identity, "operation": call.operation,
                                    **request.material})
        if mode == REFRESH:
            return await self._run(call, handler, key, Flight())
        return await self._serve(call, handler, key)

    async def _serve(self, call: Call, handler: Handler, key: bytes) -> Any:
        flights = self.cache.flights
        while (flight := flights.get(key)) is not None:
            record = await asyncio.shield(flight.done)
            if record is not None:
                return self._hit(call, copy.deepcopy(record))
        flight = flights[key] = Flight()  # no await since the check: one leader per key
        try:
            record = await self.cache.lookup(key)
        except BaseException:
            self.cache.store_later(key, flight, None)
            raise
        if record is not None:
            flight.finish(record)
            self.cache.store_later(key, flight, None)  # nothing to write: just land
            return self._hit(call, record)
        return await self._run(call, handler, key, flight)

    def _hit(self, call: Call, record: Record) -> ValueReply | StreamReply:
        call.meta["cache"] = "hit"
        self.cache.outcomes["hit"] += 1
        reply = record.reply()
        if isinstance(reply, StreamReply):
            call.state["reply"] = reply
        elif isinstance(reply.value, Mapping):
            call.state["usage"] = reply.value.get("usage")
        return reply

    async def _bypass(self, call: Call, handler: Handler) -> Any:
        call.meta["cache"] = "bypass"
        self.cache.outcomes["bypass"] += 1
        return await handler(call)

    async def _run(self, call: Call, handler: Handler, key: bytes, flight: Flight) -> Any:
        call.meta["cache"] = "miss"
        self.cache.outcomes["miss"] += 1
        try:
            reply = await handler(call)
        except BaseException:
            self.cache.store_later(key, flight, None)  # errors are never cached
            raise
        if isinstance(reply, ValueReply):
            self.cache.store_later(key, flight, Record(reply.model, "value", value=reply.value))
            return reply
        if isinstance(reply, StreamReply):
            return self._recorded(reply, key, flight)
        self.cache.store_later(key, flight, None)
        return reply

    def _recorded(self, reply: StreamReply, key: bytes, flight: Flight) -> StreamReply:
        """``reply`` passed through while its events are recorded; stored only once it
        ended with its final event (never a stream that failed or that its client left)."""
        recorder = Recorder(reply.model, reply.kind, self.cache.max_entry_bytes)
        settled = False

        def settle() -> None:
            nonlocal settled
            if not settled:
                settled = True
                whole = recorder.complete and not recorder.oversized
                self.cache.store_later(key, flight, recorder.record if whole else None)

        async def events() -> AsyncIterator[Delta | Final]:
            async for event in reply:
                recorder.see(event)
                if isinstance(event, Final):
                    settle()
                yield event

        recorded = StreamReply(reply.model, events(), kind=reply.kind)
        recorded.on_close(reply.aclose)  # gives the model's queue place back
        recorded.on_close(settle)  # closed before the end: nothing stored, followers retry
        return recorded
