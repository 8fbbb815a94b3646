"""The response cache as other plugins see it (``kernel.service("cache")``): the tiers in
profile order, read through and written through, and the calls in flight.

A lookup asks each tier in the order the profile names them (``kernel.drivers("cache")``);
a hit in a later tier is copied into the earlier ones (promotion), so the next hit is
cheaper. A new answer is written to every tier. A tier that fails is logged and skipped:
the cache makes answers cheaper, it never makes a request fail.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from inferno.kernel import KernelHandle

from .events import CacheCleared
from .records import Record

#: Seconds ``close`` waits for writes still under way.
CLOSE_WAIT = 10.0
#: Decoded records remembered for the bytes a tier returned (see ``_decode``).
DECODED = 256


@dataclass
class Flight:
    """A call running the model for a key; identical calls wait for its record."""

    done: asyncio.Future[Record | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    def finish(self, record: Record | None) -> None:
        if not self.done.done():
            self.done.set_result(record)


class ResponseCache:
    """Tiers, flights and counters; offered as the ``cache`` service."""

    def __init__(self, kernel: KernelHandle, config: Mapping[str, Any],
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self.kernel = kernel
        self.config = config
        self.log = log
        self.max_entry_bytes = int(config["max_entry_bytes"])
        #: Keys being computed now → their flight (in-flight deduplication).
        self.flights: dict[bytes, Flight] = {}
        #: What calls were told in this process: hit, miss, bypass.
        self.outcomes: dict[str, int] = {"hit": 0, "miss": 0, "bypass": 0}
        self._writes: set[asyncio.Task[None]] = set()
        #: The warm-up running in the background, if the profile lists any.
        self.warmup: asyncio.Task[None] | None = None
        self._decoded: OrderedDict[bytes, tuple[bytes, Record]] = OrderedDict()

    @property
    def tiers(self) -> dict[str, Any]:
        """The running tiers, in profile order."""
        return dict(self.kernel.drivers("cache"))

    # ------------------------------------------------------------------ entries

    async def lookup(self, key: bytes) -> Record | None:
        """The first tier's entry for ``key``, copied into the tiers before it."""
        tiers = list(self.tiers.items())
        for index, (name, tier) in enumerate(tiers):
            try:
                data = await tier.get(key)
            except Exception as exc:
                self.log.warning("cache tier failed to read", tier=name, error=repr(exc))
                continue
            if data is None:
                continue
            try:
                record = self._decode(key, data)
            except (ValueError, KeyError, TypeError) as exc:
                self.log.warning("unreadable cache entry dropped", tier=name, error=repr(exc))
                with contextlib.suppress(Exception):
                    await tier.delete(key)
                continue
            for earlier_name, earlier in tiers[:index]:
                await self._put(earlier_name, earlier, key, data)
            return record
        return None

    def _decode(self, key: bytes, data: bytes) -> Record:
        """The record in ``data``. The memory tier hands back the very bytes object it
        holds, so a record decoded from it before is reused: decoding an embedding's
        floats costs about as much as the rest of a hit. Replies share its value, which
        protocols only read."""
        known = self._decoded.get(key)
        if known is not None and known[0] is data:
            self._decoded.move_to_end(key)
            return known[1]
        record = Record.decode(data)
        self._decoded[key] = (data, record)
        if len(self._decoded) > DECODED:
            self._decoded.popitem(last=False)
        return record

    async def store(self, key: bytes, data: bytes) -> None:
        """Write an encoded record to every tier, unless it is over ``max_entry_bytes``."""
        if len(data) > self.max_entry_bytes:
            self.log.debug("answer too large to cache", key=key.decode(), bytes=len(data))
            return
        for name, tier in self.tiers.items():
            await self._put(name, tier, key, data)

    def store_later(self, key: bytes, flight: Flight, record: Record | None) -> None:
        """Hand ``record`` to the calls waiting on ``flight`` now and write it to the tiers
        in the background; the flight stays open until the write is done, so a call that
        comes meanwhile is answered from it rather than running the model again."""
        data = record.encode() if record is not None else None  # now: the value may change
        flight.finish(record)
        if data is None:
            self._land(key, flight)
            return
        task = asyncio.ensure_future(self._write(key, flight, data))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: bytes, flight: Flight, data: bytes) -> None:
        try:
            await self.store(key, data)
        finally:
            self._land(key, flight)

    def _land(self, key: bytes, flight: Flight) -> None:
        if self.flights.get(key) is flight:
            del self.flights[key]

    async def _put(self, name: str, tier: Any, key: bytes, data: bytes) -> None:
        try:
            await tier.put(key, data)
        except Exception as exc:
            self.log.warning("cache tier failed to write", tier=name, error=repr(exc))

    # ------------------------------------------------------------------ administration

    def stats(self) -> dict[str, dict[str, int]]:
        """``{tier: {hits, misses, evictions, bytes, entries}}``, in profile order."""
        return {name: {k: int(v) for k, v in tier.stats().items()}
                for name, tier in self.tiers.items()}

    async def fresh_stats(self) -> dict[str, dict[str, int]]:
        """``stats`` after tiers that count remotely (Redis) counted again."""
        for tier in self.tiers.values():
            refresh = getattr(tier, "refresh_stats", None)
            if refresh is not None:
                await refresh()
        return self.stats()

    async def clear(self, tier: str | None = None, model: str | None = None) -> dict[str, int]:
        """Remove every entry, or one tier's, or one model's; ``{tier: entries removed}``."""
        tiers = self.tiers
        if tier is not None and tier not in tiers:
            raise LookupError(f"no cache tier named {tier!r}; the tiers are "
                              f"{', '.join(tiers) or 'none'}")
        await self.settled()  # an answer still on its way to the tiers would outlive the clear
        removed: dict[str, int] = {}
        for name, driver in tiers.items():
            if tier is not None and name != tier:
                continue
            removed[name] = int(await driver.clear(model=model) if model
                                else await driver.clear())
            self.kernel.bus.publish(CacheCleared(tier=name, model=model or "",
                                                 entries=removed[name]))
        return removed

    async def settled(self, timeout: float = CLOSE_WAIT) -> None:
        """Wait until the writes under way are done (up to ``timeout`` seconds)."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)

    async def close(self) -> None:
        """Let writes under way finish (up to ``CLOSE_WAIT``), then release waiting calls."""
        await self.settled()
        for flight in list(self.flights.values()):
            flight.finish(None)
        self.flights.clear()
