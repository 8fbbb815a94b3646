"""The ``redis`` cache tier: one cache shared by every Inferno process that names the
same Redis server and ``key_prefix``.

Each entry is one string key, ``<key_prefix><model>/<digest>``, written with ``SET ... PX``
so Redis expires it itself; Redis's ``maxmemory-policy`` bounds its size. A Redis that does
not answer within ``timeout`` is a miss (and a write is skipped), never a failed request:
the cache is an optimisation, the model still answers. Hits and misses are this process's;
entries and bytes are counted by ``SCAN`` when ``refresh_stats`` runs (the admin route and
``inferno cache stats`` run it), not on every ``stats`` call, which must not block.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from dynaconf import Validator

from inferno.kernel import CacheTier, ConfigSpec, DriverContext, hookimpl

from .tiers import Counters

DEFAULTS: dict[str, Any] = {
    # The Redis server, e.g. "redis://127.0.0.1:6379/0"; may hold a password (never logged).
    "url": "redis://127.0.0.1:6379/0",
    # Prefix of every key this tier writes; processes that share it share entries.
    "key_prefix": "inferno:cache:",
    # Seconds an entry lives; 0 keeps it until Redis evicts it.
    "ttl": 3600.0,
    # Seconds a Redis call may take before it counts as a miss.
    "timeout": 0.5,
}
#: Seconds between two warnings that Redis does not answer.
_WARN_EVERY = 10.0
_GLOB = re.compile(r"([*?\[\]\\])")


class RedisTier(CacheTier):
    """Values in Redis through redis-py's asyncio client."""

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, secrets=frozenset({"url"}), validators=[
            Validator("url", is_type_of=str,
                      condition=lambda url: url.startswith(("redis://", "rediss://",
                                                            "unix://")),
                      messages={"condition": "url must start with redis://, rediss:// or "
                                             "unix://"}),
            Validator("key_prefix", is_type_of=str),
            Validator("ttl", is_type_of=(int, float), gte=0),
            Validator("timeout", is_type_of=(int, float), gt=0),
        ])

    def __init__(self, context: DriverContext) -> None:
        super().__init__(context)
        self.prefix = str(self.config.get("key_prefix", DEFAULTS["key_prefix"])).encode()
        self.ttl = float(self.config.get("ttl", DEFAULTS["ttl"]))
        self.counters = Counters()
        self._entries = 0
        self._bytes = 0
        self._warned = -float("inf")
        self.client: Any = None

    async def start(self) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        timeout = float(self.config.get("timeout", DEFAULTS["timeout"]))
        self.client = Redis.from_url(str(self.config["url"]), socket_timeout=timeout,
                                     socket_connect_timeout=timeout,
                                     retry=Retry(NoBackoff(), 1))
        try:
            await self.client.ping()
        except Exception as exc:  # down now may be up later: each call tries again
            self._warn(exc)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def get(self, key: bytes) -> bytes | None:
        try:
            value = await self.client.get(self.prefix + key)
        except Exception as exc:
            self._warn(exc)
            value = None
        if value is None:
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        return bytes(value)

    async def put(self, key: bytes, value: bytes, ttl: float | None = None) -> None:
        seconds = self.ttl if ttl is None else ttl
        try:
            await self.client.set(self.prefix + key, value,
                                  px=int(seconds * 1000) if seconds > 0 else None)
        except Exception as exc:
            self._warn(exc)

    async def delete(self, key: bytes) -> bool:
        return bool(await self.client.delete(self.prefix + key))

    async def clear(self, model: str | None = None) -> int:
        """Remove every entry under the prefix, or only ``model``'s; return how many went."""
        removed = 0
        batch: list[bytes] = []
        async for name in self.client.scan_iter(match=self._pattern(model), count=1000):
            batch.append(name)
            if len(batch) >= 500:
                removed += int(await self.client.unlink(*batch))
                batch = []
        if batch:
            removed += int(await self.client.unlink(*batch))
        return removed

    def stats(self) -> Mapping[str, int]:
        return self.counters.snapshot(self._bytes, self._entries)

    async def refresh_stats(self) -> None:
        """Count the entries under the prefix and their bytes (``SCAN`` and ``STRLEN``)."""
        entries = size = 0
        try:
            async for name in self.client.scan_iter(match=self._pattern(None), count=1000):
                entries += 1
                size += int(await self.client.strlen(name))
        except Exception as exc:
            self._warn(exc)
            return
        self._entries, self._bytes = entries, size

    def _pattern(self, model: str | None) -> bytes:
        prefix = self.prefix + (model.encode() + b"/" if model else b"")
        return _GLOB.sub(r"\\\1", prefix.decode()).encode() + b"*"

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            self.log.warning("redis cache unavailable: calls go on without it",
                             error=f"{type(exc).__name__}: {exc}")
