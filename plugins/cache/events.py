"""Kernel events the response cache publishes (topics ``cache.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from inferno.kernel import Event


@dataclass(frozen=True, kw_only=True)
class CacheCleared(Event):
    """Entries removed on request (``inferno cache clear``, ``DELETE /api/v1/cache``)."""

    TOPIC = "cache.cleared"
    tier: str
    #: The model whose entries went; empty when the whole tier was cleared.
    model: str
    entries: int


@dataclass(frozen=True, kw_only=True)
class CacheEvicted(Event):
    """Entries a tier dropped to stay within its bounds, or because they expired: one event
    per write that made room, not one per entry."""

    TOPIC = "cache.evicted"
    tier: str
    entries: int
    #: ``full`` (over max_entries or max_bytes) or ``expired``
    reason: str
