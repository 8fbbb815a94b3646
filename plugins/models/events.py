"""Kernel events the model manager publishes (topics ``model.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from inferno.kernel import Event


@dataclass(frozen=True, kw_only=True)
class ModelDiscovered(Event):
    TOPIC = "model.discovered"
    model: str
    path: str
    source: str


@dataclass(frozen=True, kw_only=True)
class ModelLoading(Event):
    TOPIC = "model.loading"
    model: str
    backend: str
    version: str


@dataclass(frozen=True, kw_only=True)
class ModelLoaded(Event):
    TOPIC = "model.loaded"
    model: str
    backend: str
    version: str
    seconds: float
    memory_bytes: int


@dataclass(frozen=True, kw_only=True)
class ModelUnloaded(Event):
    TOPIC = "model.unloaded"
    model: str
    version: str
    #: idle (keep_alive ran out), evicted, replaced, requested or shutdown
    reason: str


@dataclass(frozen=True, kw_only=True)
class ModelFailed(Event):
    TOPIC = "model.failed"
    model: str
    error: str
    #: load, verify (a checksum mismatch), swap (a new version) or rollback
    stage: str


@dataclass(frozen=True, kw_only=True)
class ModelSwapped(Event):
    TOPIC = "model.swapped"
    model: str
    previous: str
    current: str
    rollback: bool = False
