"""What a cache entry holds, and how a hit becomes a reply again.

A value reply (embeddings) is stored as its value. A generation is stored as the deltas
its stream carried (text and tokens, in order) and its final event (finish reason, usage,
tool calls), so a hit is replayed as a :class:`StreamReply` yielding the same deltas: a
streaming client sees the same frames, a plain client collects the same text. The usage
is the stored one: what the answer cost when the model made it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferno.plugins.gateway.calls import Delta, Final, StreamReply, ToolCall, ValueReply


@dataclass
class Record:
    """One cached answer."""

    model: str
    #: ``value`` (a ValueReply), ``chat`` or ``completion`` (a StreamReply of that kind).
    kind: str
    value: Any = None
    deltas: list[tuple[str, int]] = field(default_factory=list)
    final: Final | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {"model": self.model, "kind": self.kind}
        if self.kind == "value":
            body["value"] = self.value
        else:
            assert self.final is not None, "only a finished generation is stored"
            body["deltas"] = self.deltas
            body["final"] = {"finish_reason": self.final.finish_reason,
                             "usage": dict(self.final.usage),
                             "tool_calls": [[c.id, c.name, c.arguments]
                                            for c in self.final.tool_calls]}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Record:
        body = json.loads(data)
        if body["kind"] == "value":
            return cls(body["model"], "value", value=body["value"])
        final = body["final"]
        return cls(body["model"], body["kind"],
                   deltas=[(str(text), int(tokens)) for text, tokens in body["deltas"]],
                   final=Final(final["finish_reason"], final["usage"],
                               tuple(ToolCall(*call) for call in final["tool_calls"])))

    def reply(self) -> ValueReply | StreamReply:
        """A fresh reply replaying this record."""
        if self.kind == "value":
            return ValueReply(self.value, model=self.model)
        return StreamReply(self.model, _replay(self.deltas, self.final), kind=self.kind)


async def _replay(deltas: Sequence[tuple[str, int]], final: Final | None
                  ) -> AsyncIterator[Delta | Final]:
    for text, tokens in deltas:
        yield Delta(text, tokens)
    assert final is not None
    yield final


class Recorder:
    """Collects a stream's events while they pass, within ``limit`` bytes of text."""

    def __init__(self, model: str, kind: str, limit: int) -> None:
        self.record = Record(model, kind)
        self.limit = limit
        self._size = 0
        self.oversized = False

    def see(self, event: Delta | Final) -> None:
        if isinstance(event, Final):
            self.record.final = event
            return
        self._size += len(event.text.encode()) + 8
        if self._size > self.limit:
            self.oversized, self.record.deltas = True, []
        elif not self.oversized:
            self.record.deltas.append((event.text, event.tokens))

    @property
    def complete(self) -> bool:
        return self.record.final is not None
