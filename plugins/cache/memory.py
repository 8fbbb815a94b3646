"""The ``memory`` cache tier: least recently used entries in this process, bounded by
their number and their bytes, each living at most ``ttl`` seconds.

It is the first tier a profile names in most setups: a hit costs a dictionary lookup, no
thread hop and no decompression. It is lost when the process stops.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dynaconf import Validator

from inferno.kernel import CacheTier, ConfigSpec, DriverContext, hookimpl

from .events import CacheEvicted
from .tiers import Counters, model_of

DEFAULTS: dict[str, Any] = {
    # Most entries kept; the least recently used go first.
    "max_entries": 10_000,
    # Most bytes of values kept (keys and bookkeeping not counted).
    "max_bytes": 256 * 1024 * 1024,
    # Seconds an entry lives; 0 keeps it until it is evicted.
    "ttl": 3600.0,
}


@dataclass
class _Entry:
    value: bytes
    expires: float  # the clock's time, or infinity


class MemoryTier(CacheTier):
    """An LRU of bytes in a dict that remembers order; every method runs on the event loop
    without awaiting, so concurrent calls never see it half changed."""

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, validators=[
            Validator("max_entries", is_type_of=int, gte=1),
            Validator("max_bytes", is_type_of=int, gte=1),
            Validator("ttl", is_type_of=(int, float), gte=0),
        ])

    def __init__(self, context: DriverContext) -> None:
        super().__init__(context)
        self.max_entries = int(self.config.get("max_entries", DEFAULTS["max_entries"]))
        self.max_bytes = int(self.config.get("max_bytes", DEFAULTS["max_bytes"]))
        self.ttl = float(self.config.get("ttl", DEFAULTS["ttl"]))
        #: Seconds, monotonic; tests replace it to move time without waiting.
        self.clock: Callable[[], float] = time.monotonic
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        self.counters = Counters()

    async def get(self, key: bytes) -> bytes | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= self.clock():
            self._remove(key)
            self._evicted(1, "expired")
            entry = None
        if entry is None:
            self.counters.misses += 1
            return None
        self._entries.move_to_end(key)
        self.counters.hits += 1
        return entry.value

    async def put(self, key: bytes, value: bytes, ttl: float | None = None) -> None:
        if len(value) > self.max_bytes:
            return  # it would push out everything else and still not fit
        seconds = self.ttl if ttl is None else ttl
        expires = self.clock() + seconds if seconds > 0 else float("inf")
        self._remove(key)
        self._entries[key] = _Entry(bytes(value), expires)
        self._bytes += len(value)
        dropped = 0
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            dropped += 1
        if dropped:
            self._evicted(dropped, "full")

    async def delete(self, key: bytes) -> bool:
        return self._remove(key)

    async def clear(self, model: str | None = None) -> int:
        """Remove every entry, or only ``model``'s; return how many went."""
        keys = [k for k in self._entries if model is None or model_of(k) == model]
        for key in keys:
            self._remove(key)
        return len(keys)

    def stats(self) -> Mapping[str, int]:
        return self.counters.snapshot(self._bytes, len(self._entries))

    def _remove(self, key: bytes) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= len(entry.value)
        return True

    def _evicted(self, count: int, reason: str) -> None:
        self.counters.evictions += count
        self.context.kernel.bus.publish(CacheEvicted(tier=self.name, entries=count,
                                                     reason=reason))
