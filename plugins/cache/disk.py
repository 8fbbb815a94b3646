"""The ``disk`` cache tier: entries that survive restarts, zstd-compressed, in diskcache.

diskcache keeps each entry as one row of an SQLite database in WAL mode (values over 32 KiB
in a file of their own, written whole before the row that points at it is committed), so a
process killed mid-write leaves either the old state or the new one, never a half entry.
Each value is also a zstd frame with its content checksum: a value that fails it (a disk
error, a file changed behind diskcache's back) is deleted and read as a miss, never served.

Several processes may share one directory (diskcache locks through SQLite). Hits and
misses are counted by diskcache in the database, so every process sharing the directory
(and ``inferno cache stats``) sees the same figures; evictions are counted per process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zstandard
from dynaconf import Validator

from inferno.kernel import CacheTier, ConfigSpec, DriverContext, hookimpl

from .events import CacheEvicted
from .tiers import Counters, model_of

DEFAULTS: dict[str, Any] = {
    # The cache's folder; "" is this tier's folder in the data directory (cache/disk), a
    # relative path is relative to the data directory.
    "directory": "",
    # Most bytes on disk (values and the database); the least recently used go first.
    "max_bytes": 1024 * 1024 * 1024,
    # Seconds an entry lives; 0 keeps it until it is evicted.
    "ttl": 86400.0,
    # zstd level: 1 (fastest) to 22 (smallest); 3 is zstd's default.
    "zstd_level": 3,
    # What goes first when full: diskcache's least-recently-used, least-recently-stored
    # (no write on reads) or least-frequently-used.
    "eviction_policy": "least-recently-used",
}
POLICIES = ("least-recently-used", "least-recently-stored", "least-frequently-used")


class DiskTier(CacheTier):
    """A diskcache ``Cache`` used from worker threads (it opens one connection per thread)."""

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, validators=[
            Validator("directory", is_type_of=str),
            Validator("max_bytes", is_type_of=int, gte=1024 * 1024),
            Validator("ttl", is_type_of=(int, float), gte=0),
            Validator("zstd_level", is_type_of=int, gte=1, lte=22),
            Validator("eviction_policy", is_in=list(POLICIES)),
        ])

    def __init__(self, context: DriverContext) -> None:
        super().__init__(context)
        self.ttl = float(self.config.get("ttl", DEFAULTS["ttl"]))
        self.level = int(self.config.get("zstd_level", DEFAULTS["zstd_level"]))
        self.counters = Counters()
        self._cache: Any = None
        #: The database's figures as last read (hits, misses, bytes, entries): read off the
        #: event loop by ``refresh_stats``, so that a scrape never waits on SQLite.
        self._figures = (0, 0, 0, 0)

    @property
    def directory(self) -> Path:
        given = str(self.config.get("directory", "")).strip()
        if not given:
            return self.context.data_dir
        path = Path(given).expanduser()
        return path if path.is_absolute() else self.context.kernel.data_dir / path

    async def start(self) -> None:
        import diskcache

        directory = self.directory
        self._cache = await asyncio.to_thread(
            diskcache.Cache, str(directory),
            size_limit=int(self.config.get("max_bytes", DEFAULTS["max_bytes"])),
            eviction_policy=str(self.config.get("eviction_policy",
                                                DEFAULTS["eviction_policy"])),
            tag_index=True, statistics=True)
        await self.refresh_stats()
        self.log.info("disk cache", directory=str(directory), entries=self._figures[3])

    async def stop(self) -> None:
        if self._cache is not None:
            await asyncio.to_thread(self._cache.close)
            self._cache = None

    async def get(self, key: bytes) -> bytes | None:
        return await asyncio.to_thread(self._get, key)

    async def put(self, key: bytes, value: bytes, ttl: float | None = None) -> None:
        seconds = self.ttl if ttl is None else ttl
        evicted = await asyncio.to_thread(self._put, key, value, seconds)
        if evicted:
            self.counters.evictions += evicted
            self.context.kernel.bus.publish(CacheEvicted(tier=self.name, entries=evicted,
                                                         reason="full"))

    async def delete(self, key: bytes) -> bool:
        return bool(await asyncio.to_thread(self._cache.delete, key, True))

    async def clear(self, model: str | None = None) -> int:
        """Remove every entry, or only ``model``'s (its tag); return how many went."""
        if model is None:
            return int(await asyncio.to_thread(self._cache.clear, True))
        return int(await asyncio.to_thread(self._cache.evict, model, True))

    def stats(self) -> Mapping[str, int]:
        """The figures ``refresh_stats`` last read (it runs before every stats answer)."""
        hits, misses, size, entries = self._figures
        counters = Counters(hits=hits, misses=misses, evictions=self.counters.evictions)
        return counters.snapshot(size, entries)

    async def refresh_stats(self) -> None:
        """Read the database's own counters (no scan of the entries) in a worker thread: with
        several processes on one directory, SQLite may make a reader wait for a writer."""
        def read() -> tuple[int, int, int, int]:
            hits, misses = self._cache.stats()
            return int(hits), int(misses), int(self._cache.volume()), len(self._cache)

        if self._cache is not None:
            self._figures = await asyncio.to_thread(read)

    # ------------------------------------------------------------------ in a worker thread

    def _get(self, key: bytes) -> bytes | None:
        stored = self._cache.get(key, default=None, retry=True)
        if stored is None:
            return None
        try:
            return zstandard.ZstdDecompressor().decompress(bytes(stored))
        except zstandard.ZstdError as exc:
            self.log.warning("corrupt disk cache entry deleted", model=model_of(key),
                             error=str(exc))
            self._cache.delete(key, retry=True)
            return None

    def _put(self, key: bytes, value: bytes, seconds: float) -> int:
        """Store ``value``; return how many other entries diskcache culled to make room."""
        frame = zstandard.ZstdCompressor(level=self.level, write_checksum=True,
                                         write_content_size=True).compress(value)
        before = len(self._cache)
        existed = key in self._cache
        self._cache.set(key, frame, expire=seconds if seconds > 0 else None,
                        tag=model_of(key) or None, retry=True)
        return max(0, before + (0 if existed else 1) - len(self._cache))
