"""What the model manager keeps per model: loaded versions and the files behind them."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from inferno.kernel import LoadedModel, Reservation

from .registry import Entry


@dataclass(frozen=True)
class Stamp:
    """What identifies one version of a file on disk."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Stamp:
        st = path.stat()
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)

    @property
    def id(self) -> str:
        return f"{self.mtime_ns:x}-{self.size:x}"


@dataclass(eq=False)
class Version:
    """One loaded file of a model."""

    entry: Entry
    path: Path
    stamp: Stamp
    model: LoadedModel
    reservation: Reservation
    backend: str
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    retired: bool = False


@dataclass(eq=False)
class Resident:
    """A model that is loaded: its current version and what it needs to stay or go."""

    name: str
    current: Version
    keep_alive: float
    last_used: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None
    previous: Path | None = None
    rejected: Stamp | None = None  # a file version that failed or was rolled back from


def keep_version(versions: Path, resident: Resident, path: Path,
                 log: structlog.typing.FilteringBoundLogger) -> Path | None:
    """Keep the loaded file under a second name (a hard link: no copy) for rollback; only the
    current and the previous version stay."""
    folder = versions / resident.name
    kept = folder / f"{resident.current.stamp.id}{path.suffix}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not kept.exists():
            os.link(path, kept)
    except OSError as exc:
        log.debug("cannot keep this version for rollback", model=resident.name,
                  reason=exc.strerror)
        return None
    for old in folder.iterdir():
        if old not in (kept, resident.previous):
            old.unlink(missing_ok=True)
    return kept
