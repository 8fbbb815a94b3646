"""The file format: one JSON object per event, ``topic`` and ``time`` first.

Kept apart from the exporter so that readers of the file (``inferno events``,
tests, other tools) and its writer agree on one definition.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from inferno.kernel import Event


def event_record(event: Event) -> dict[str, Any]:
    """The event as a plain dict: its topic, then every dataclass field (``time`` included)."""
    record: dict[str, Any] = {"topic": event.topic}
    record.update({f.name: getattr(event, f.name) for f in dataclasses.fields(event)})
    return record


def to_json_line(event: Event) -> str:
    """One line of the file, newline included; values JSON cannot hold become lists or text."""
    return json.dumps(event_record(event), default=_plain, ensure_ascii=False) + "\n"


def last_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of ``path``, without their newlines.

    Reads the file once, keeping only ``count`` lines in memory, so a large
    event file costs time but not memory.
    """
    if count <= 0:
        return []
    with path.open(encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in deque(handle, maxlen=count)]


def _plain(value: Any) -> Any:
    """What ``json`` calls for a value it cannot encode: events are frozen, so their
    mappings and sets arrive as read-only types."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)
