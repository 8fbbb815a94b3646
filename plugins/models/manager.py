"""The model manager: which models are loaded, for whom, and for how long.

A model is loaded on first use (or at start when preloaded) by the backend that
claims its format, with a reservation of its estimated memory in the kernel's
resource manager. Idle models are unloaded when their ``keep_alive`` runs out
or, least recently used first, when a new load needs room. Concurrent first
requests for one model share one load.

Each load is a *version*: when a model's file is replaced, the new file is
loaded beside the old one, new requests switch to it at once, requests in
flight finish on the old one, which is then unloaded. A failed new version
leaves the old one serving. The previous version's file is kept (a hard link in
the data directory, no copy) so it can be rolled back to.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog

from inferno.kernel import (
    Backend,
    EvictionRequest,
    KernelHandle,
    LoadedModel,
    ModelSpec,
    ResourceExhausted,
)
from inferno.kernel.resources import parse_amount

from .errors import ModelError, NoBackend
from .events import ModelFailed, ModelLoaded, ModelLoading, ModelSwapped, ModelUnloaded
from .formats import ModelFile, describe
from .integrity import ChecksumCache
from .registry import Entry, Registry
from .residents import Resident, Stamp, Version, keep_version


class ModelManager:
    """Loads, keeps, evicts and swaps models; offered to other plugins as ``models``."""

    def __init__(self, kernel: KernelHandle, config: Mapping[str, Any], registry: Registry,
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self.kernel = kernel
        self.config = config
        self.registry = registry
        self.log = log
        data = kernel.plugin_data_dir("plugins", "models")
        self.versions_dir = data / "versions"
        self.checksums = ChecksumCache(data / "checksums.sqlite")
        self.keep_alive = float(config["keep_alive"])
        self.max_loaded = int(config["max_loaded"])
        memory = config["memory"]
        self.memory_budget = 0 if memory == "auto" else parse_amount(memory)
        self.residents: dict[str, Resident] = {}
        self._loading: dict[str, asyncio.Future[Resident]] = {}
        self._swapping: dict[str, asyncio.Lock] = {}
        self._described: dict[Path, tuple[Stamp, ModelFile]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Every version loaded and not yet closed: current, retired and still serving, or
        #: loaded by a swap that has not switched yet.
        self._open: set[Version] = set()
        self._closing = False
        #: Models the profile preloads that failed to load, with the reason.
        self.preload_failures: dict[str, str] = {}

    # ------------------------------------------------------------------ lookups

    def entry(self, name: str) -> Entry:
        return self.registry.get(name)

    def describe(self, name: str) -> ModelFile:
        """The model's file: format and metadata, read once per file version."""
        entry = self.entry(name)
        return self._describe(entry.require_path(), entry.name)

    def _describe(self, path: Path, name: str) -> ModelFile:
        try:
            stamp = Stamp.of(path)
        except OSError as exc:
            raise ModelError(name, f"cannot read {path}: {exc.strerror}") from None
        cached = self._described.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, describe(path))
            self._described[path] = cached
        return cached[1]

    def backend_for(self, entry: Entry, format_: str) -> Backend:
        backends: Mapping[str, Any] = self.kernel.drivers("backends")
        enabled = ", ".join(f"{n} ({', '.join(sorted(b.formats))})"
                            for n, b in backends.items()) or "none"
        if entry.backend:
            backend = backends.get(entry.backend)
            if backend is None:
                raise NoBackend(entry.name, f"its backend {entry.backend!r} is not enabled "
                                            f"(enabled backends: {enabled})")
            if format_ not in backend.formats:
                raise NoBackend(entry.name, f"backend {entry.backend!r} does not load "
                                            f"{format_} files")
            return backend  # type: ignore[no-any-return]
        for backend in backends.values():
            if format_ in backend.formats:
                return backend  # type: ignore[no-any-return]
        raise NoBackend(entry.name, f"no backend for format {format_} (enabled backends: "
                                    f"{enabled})")

    def status(self) -> list[dict[str, Any]]:
        """Every registered model with what is known of it without reading files."""
        rows = []
        for name, entry in sorted(self.registry.entries.items()):
            resident = self.residents.get(name)
            rows.append({
                "name": name, "path": str(entry.path) if entry.path else None,
                "source": entry.source, "aliases": list(entry.aliases),
                "description": entry.description or None,
                "loaded": resident is not None,
                "version": resident.current.stamp.id if resident else None,
                "inflight": resident.current.inflight if resident else 0,
                "unavailable": entry.unavailable or None,
            })
        return rows

    # ------------------------------------------------------------------ use

    @asynccontextmanager
    async def use(self, name: str, *, keep_alive: float | None = None
                  ) -> AsyncIterator[LoadedModel]:
        """The loaded model for one request; loads it first if needed."""
        entry = self.registry.get(name)
        resident = self.residents.get(entry.name) or await self.load(entry.name)
        version = resident.current
        version.inflight += 1
        if resident.timer is not None:
            resident.timer.cancel()
            resident.timer = None
        try:
            yield version.model
        finally:
            version.inflight -= 1
            resident.last_used = time.monotonic()
            if keep_alive is not None:
                resident.keep_alive = float(keep_alive)
            if version.retired:
                if version.inflight == 0:
                    self._spawn(self._close(version, "replaced"))
            elif version.inflight == 0:
                self._schedule_idle(resident)

    async def load(self, name: str) -> Resident:
        """Load ``name`` unless it is loaded; concurrent callers share one load."""
        entry = self.registry.get(name)
        if entry.name in self.residents:
            return self.residents[entry.name]
        pending = self._loading.get(entry.name)
        if pending is None:
            if self._closing:
                raise ModelError(entry.name, "Inferno is shutting down; the model is not "
                                             "loaded")
            pending = asyncio.ensure_future(self._load_resident(entry))
            self._loading[entry.name] = pending
            pending.add_done_callback(lambda _: self._loading.pop(entry.name, None))
        return await asyncio.shield(pending)

    async def preload(self, name: str) -> Resident:
        """Load ``name`` to stay: a preloaded model is kept until told otherwise (its entry's
        keep_alive, when it sets one, still applies)."""
        resident = await self.load(name)
        if resident.current.entry.keep_alive is None:
            resident.keep_alive = -1.0
        return resident

    async def _load_resident(self, entry: Entry) -> Resident:
        path = entry.require_path()
        version = await self._load_version(entry, path)
        resident = Resident(entry.name, version, self._keep_alive_of(entry))
        self.residents[entry.name] = resident
        self.preload_failures.pop(entry.name, None)  # loads now: ready again
        keep_version(self.versions_dir, resident, path, self.log)
        return resident

    async def _load_version(self, entry: Entry, path: Path, stage: str = "load") -> Version:
        bus = self.kernel.bus
        failing = stage
        try:
            stamp = Stamp.of(path)
            described = await asyncio.to_thread(self._describe, path, entry.name)
            if entry.format and entry.format != described.format:
                raise ModelError(entry.name, f"{path} is a {described.format} file, but its "
                                             f"entry says format {entry.format!r}")
            backend = self.backend_for(entry, described.format)
            if entry.sha256:
                failing = "verify"
                await asyncio.to_thread(self.checksums.verify, path, entry.sha256)
                failing = stage
            spec = ModelSpec(entry.name, path, described.format, entry.backend_options(),
                             described.metadata)
            need = backend.estimate_memory(spec)
            await self._make_room(entry.name, need)
            reservation = self.kernel.resources.reserve("memory", need, f"model:{entry.name}")
        except ModelError as exc:
            self._failed(entry.name, exc, failing)
            raise
        except (ResourceExhausted, OSError) as exc:
            reason = (f"cannot read {path}: {exc.strerror}" if isinstance(exc, OSError)
                      else str(exc))
            error = ModelError(entry.name, reason)
            self._failed(entry.name, error, stage)
            raise error from exc
        bus.publish(ModelLoading(model=entry.name, backend=backend.name, version=stamp.id))
        started = time.perf_counter()
        try:
            model = await backend.load(spec)
        except Exception as exc:
            reservation.release()
            self._failed(entry.name, exc, stage)
            if isinstance(exc, ModelError):
                raise
            raise ModelError(entry.name, f"{backend.name} could not load {path}: "
                                         f"{type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - started
        version = Version(entry, path, stamp, model, reservation, backend.name)
        self._open.add(version)
        bus.publish(ModelLoaded(model=entry.name, backend=backend.name, version=stamp.id,
                                seconds=round(seconds, 3), memory_bytes=need))
        self.log.info("model loaded", model=entry.name, backend=backend.name,
                      seconds=round(seconds, 3), memory_mb=round(need / 2**20, 1))
        return version

    def _failed(self, name: str, exc: BaseException, stage: str) -> None:
        reason = exc.reason if isinstance(exc, ModelError) else f"{exc}"
        self.kernel.bus.publish(ModelFailed(model=name, error=reason, stage=stage))
        self.log.error("model failed", model=name, stage=stage, error=reason)

    # ------------------------------------------------------------------ room

    async def _make_room(self, name: str, need: int) -> None:
        """Unload idle models, least recently used first, until ``need`` bytes fit."""
        resources = self.kernel.resources
        while True:
            loaded = [r for n, r in self.residents.items() if n != name]
            used = sum(r.current.reservation.amount for r in loaded)
            too_many = bool(self.max_loaded) and len(loaded) >= self.max_loaded
            over_budget = bool(self.memory_budget) and used + need > self.memory_budget
            if not (too_many or over_budget or resources.available("memory") < need):
                return
            idle = sorted((r for r in loaded if r.current.inflight == 0),
                          key=lambda r: r.last_used)
            if not idle:
                if too_many:
                    why = f"{len(loaded)} models are loaded (max_loaded {self.max_loaded})"
                elif over_budget:
                    why = (f"it needs {need} bytes and the models' memory budget "
                           f"(plugins.models.memory) has {self.memory_budget - used} left")
                else:
                    why = (f"it needs {need} bytes and {resources.available('memory')} are "
                           f"free (resources.memory)")
                busy = ", ".join(r.name for r in loaded) or "none"
                raise ResourceExhausted(f"cannot load {name}: {why}, and no loaded model is "
                                        f"idle (busy: {busy})")
            await self.unload(idle[0].name, "evicted")

    def evict(self, request: EvictionRequest) -> int:
        """Free memory for another owner now: detach idle models, close them soon."""
        if request.resource != "memory":
            return 0
        freed = 0
        idle = sorted((r for r in self.residents.values() if r.current.inflight == 0
                       and f"model:{r.name}" != request.owner), key=lambda r: r.last_used)
        for resident in idle:
            if freed >= request.amount:
                break
            self._detach(resident)
            freed += resident.current.reservation.amount
            resident.current.reservation.release()
            self._spawn(self._close(resident.current, "evicted"))
        return freed

    def _keep_alive_of(self, entry: Entry) -> float:
        return entry.keep_alive if entry.keep_alive is not None else self.keep_alive

    def _schedule_idle(self, resident: Resident) -> None:
        if resident.keep_alive < 0:
            return
        if resident.keep_alive == 0:
            self._spawn(self._unload_if_idle(resident))
            return
        loop = asyncio.get_running_loop()
        resident.timer = loop.call_later(
            resident.keep_alive, lambda: self._spawn(self._unload_if_idle(resident)))

    async def _unload_if_idle(self, resident: Resident) -> None:
        if self.residents.get(resident.name) is resident and resident.current.inflight == 0:
            await self.unload(resident.name, "idle")

    # ------------------------------------------------------------------ unload

    async def unload(self, name: str, reason: str = "requested") -> bool:
        """Unload ``name`` (its in-flight requests finish first); False if it was not loaded."""
        resident = self.residents.get(self.registry.get(name).name)
        if resident is None:
            return False
        self._detach(resident)
        if resident.current.inflight == 0:
            await self._close(resident.current, reason)
        return True

    def _detach(self, resident: Resident) -> None:
        if resident.timer is not None:
            resident.timer.cancel()
        self.residents.pop(resident.name, None)
        resident.current.retired = True

    async def _close(self, version: Version, reason: str) -> None:
        if version not in self._open:
            return  # closed already (at shutdown, under a request that ended later)
        self._open.discard(version)
        try:
            await version.model.close()
        except Exception as exc:  # memory is given back either way
            self.log.error("model failed to close", model=version.entry.name, error=str(exc))
        version.reservation.release()
        self.kernel.bus.publish(ModelUnloaded(model=version.entry.name, version=version.stamp.id,
                                              reason=reason))
        self.log.info("model unloaded", model=version.entry.name, reason=reason)

    async def close(self) -> None:
        """Unload everything (at shutdown) and wait for background work. Loads and swaps
        under way finish first, and a version still serving a request is closed under it
        (the request ends with an error): no loaded model outlives the manager, since its
        threads would keep the process from ending."""
        self._closing = True  # no load or swap starts from now on
        await asyncio.gather(*self._loading.values(), return_exceptions=True)
        for lock in list(self._swapping.values()):
            async with lock:
                pass
        for name in list(self.residents):
            await self.unload(name, "shutdown")
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for version in list(self._open):
            await self._close(version, "shutdown")

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ versions

    async def check_files(self) -> list[str]:
        """Swap every loaded model whose file changed; the names swapped."""
        swapped = []
        for name, resident in list(self.residents.items()):
            path = resident.current.entry.path
            try:
                stamp = Stamp.of(path) if path else None
            except OSError:
                continue  # replaced right now: look again next time
            if stamp is None or stamp in (resident.current.stamp, resident.rejected):
                continue
            if await self.swap(name, path):
                swapped.append(name)
        return swapped

    async def rollback(self, name: str) -> None:
        """Serve the previous version again, until the file on disk changes once more."""
        resident = self.residents.get(self.registry.get(name).name)
        if resident is None or resident.previous is None or not resident.previous.exists():
            raise ModelError(name, "has no previous version to roll back to")
        entry_path = resident.current.entry.require_path()
        if not await self.swap(resident.name, resident.previous, rollback=True):
            raise ModelError(name, "the previous version failed to load; see model.failed")
        with contextlib.suppress(OSError):
            resident.rejected = Stamp.of(entry_path)

    async def swap(self, name: str, path: Path, *, rollback: bool = False) -> bool:
        """Load ``path`` as ``name``'s new version and switch to it; False if it failed."""
        lock = self._swapping.setdefault(name, asyncio.Lock())
        async with lock:
            resident = self.residents.get(name)
            if resident is None or self._closing:
                return False
            old = resident.current
            try:
                new = await self._load_version(old.entry, path,
                                               "rollback" if rollback else "swap")
            except (ModelError, OSError) as exc:
                with contextlib.suppress(OSError):
                    resident.rejected = Stamp.of(path)
                self.log.error("new version refused, the old one keeps serving", model=name,
                               error=str(exc))
                return False
            kept_old = self.versions_dir / name / f"{old.stamp.id}{old.path.suffix}"
            resident.previous = kept_old if kept_old.exists() else None
            resident.current = new
            if not rollback:
                keep_version(self.versions_dir, resident, path, self.log)
            old.retired = True
            if old.inflight == 0:
                await self._close(old, "replaced")
            self.kernel.bus.publish(ModelSwapped(model=name, previous=old.stamp.id,
                                                 current=new.stamp.id, rollback=rollback))
            self.log.info("model swapped", model=name, previous=old.stamp.id,
                          current=new.stamp.id, rollback=rollback)
            return True
