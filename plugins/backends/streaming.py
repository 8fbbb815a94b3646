"""Turning a stream of token bytes into text pieces, stop strings removed.

Each token's bytes are decoded once, incrementally: a multi-byte character
split across tokens comes out whole when its last byte arrives, and nothing is
re-detokenised. Text that could be the start of a stop string is held back
until it is known not to be one, so a stop string is never emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Feed token bytes, get the text that is safe to emit."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._pending = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Text ready to emit after ``data``; ``stopped`` turns true at a stop string."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        if not self._stops:
            ready, self._pending = self._pending, ""
            return ready
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            ready, self._pending = self._pending[:cut], ""
            return ready
        keep = self._partial_stop_length()
        ready = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(ready):]
        return ready

    def flush(self) -> str:
        """What is left at the end of generation (held-back text that was no stop string)."""
        if self.stopped:
            return ""
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return rest

    def _partial_stop_length(self) -> int:
        """The longest tail of the pending text that begins some stop string."""
        tail = self._pending[-self._longest:]
        for size in range(min(len(tail), self._longest), 0, -1):
            piece = tail[-size:]
            if any(stop.startswith(piece) for stop in self._stops):
                return size
        return 0
