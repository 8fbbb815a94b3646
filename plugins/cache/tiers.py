"""What the three tiers share: the model tag in a key, and their counters.

A key is ``<model>/<digest>`` (the model's registered name, then the blake3 digest of the
request's canonical form), so every tier finds a model's entries by that prefix, without
an index of its own: ``clear(model=...)`` in the memory tier filters on it, the disk tier
stores it as the diskcache tag, the Redis tier matches it with ``SCAN``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The separator between a model name (letters, digits and ``. _ : -``) and the digest.
SEPARATOR = b"/"


def model_of(key: bytes) -> str:
    """The model tag of a cache key (empty for a key without one)."""
    model, separator, _ = key.partition(SEPARATOR)
    return model.decode("utf-8", "replace") if separator else ""


@dataclass
class Counters:
    """Hits, misses and evictions of one tier in this process."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def snapshot(self, bytes_: int, entries: int) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "bytes": int(bytes_), "entries": int(entries)}
