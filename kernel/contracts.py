"""Typed contracts for the driver kinds that plugins provide.

A driver is a class found by name in its kind's entry-point group. The kernel
builds one instance per enabled driver, passing a :class:`DriverContext`, then
awaits ``start()`` in kind order (see ``KINDS``; within a kind, profile order)
and ``stop()`` in reverse. Per-request
work happens in the driver's own async methods, never in hook calls.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from typing import Protocol as TypingProtocol

if TYPE_CHECKING:
    import pluggy
    import structlog

    from .events import EventBus
    from .resources import ResourceManager


class KernelHandle(TypingProtocol):
    """What a driver may use of the kernel that runs it."""

    @property
    def state(self) -> str: ...

    @property
    def config(self) -> Mapping[str, Any]:
        """The whole configuration with secrets masked; a driver's own section, secrets
        included, is ``context.config``."""

    def plugin_config(self, name: str) -> Mapping[str, Any]:
        """Hook plugin ``name``'s own section with its secrets (``config`` masks them)."""

    @property
    def data_dir(self) -> Path: ...

    @property
    def bus(self) -> EventBus: ...

    @property
    def resources(self) -> ResourceManager: ...

    @property
    def hook(self) -> pluggy.HookRelay: ...

    def plugin_data_dir(self, section: str, name: str) -> Path: ...

    def drivers(self, kind: str) -> Mapping[str, Driver]: ...

    def admit(self) -> AbstractAsyncContextManager[None]: ...

    def provide(self, name: str, service: object) -> None:
        """Offer ``service`` to other plugins under ``name`` (for example ``models``)."""

    def service(self, name: str) -> Any:
        """What a plugin offered under ``name``; ``LookupError`` naming those offered if none."""

    def shutdown(self, reason: str) -> None:
        """Stop serving as SIGTERM would: drain, then stop every plugin (for a protocol whose
        input ended, like the stdin pipeline at end of file)."""


@dataclass(frozen=True)
class DriverContext:
    """Everything a driver receives when it is built."""

    name: str
    kind: str
    config: Mapping[str, Any]
    kernel: KernelHandle
    log: structlog.typing.FilteringBoundLogger

    @property
    def data_dir(self) -> Path:
        """The driver's own folder inside the kernel's data directory (created on demand)."""
        path = self.kernel.plugin_data_dir(self.kind, self.name)
        path.mkdir(parents=True, exist_ok=True)
        return path


class Driver(abc.ABC):  # noqa: B024 - start/stop are optional for simple drivers
    """Base of every driver kind."""

    kind: ClassVar[str] = ""

    def __init__(self, context: DriverContext) -> None:
        self.context = context
        self.config = context.config
        self.log = context.log

    @property
    def name(self) -> str:
        return self.context.name

    async def start(self) -> None:  # noqa: B027 - intentionally empty default
        """Acquire what the driver needs. Called once, in kind order."""

    async def stop(self) -> None:  # noqa: B027 - intentionally empty default
        """Release what ``start`` acquired. Called only if ``start`` succeeded."""


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class ModelSpec:
    """A model as the model manager hands it to a backend: never a path from a request."""

    name: str
    path: Path
    format: str
    options: Mapping[str, Any] = field(default_factory=dict)
    #: What the model manager read from the file (architecture, context length ...).
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationRequest:
    """One text generation. ``messages`` for chat, ``prompt`` for plain completion."""

    request_id: str
    prompt: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    #: Who asked, when callers are told apart: a backend never lets one owner's request
    #: reuse state (a cached prompt) left by another's.
    owner: str = ""


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed output; the last one carries ``finish_reason``."""

    text: str
    tokens: int = 0
    finish_reason: str | None = None
    usage: Mapping[str, Any] | None = None


class LoadedModel(abc.ABC):
    """A model loaded by a backend. Its methods may be called concurrently."""

    #: Requests the model serves at once (the gateway queues the rest); ``None``: as many
    #: as the gateway's ``concurrency`` setting allows.
    concurrency: int | None = None

    @property
    @abc.abstractmethod
    def info(self) -> Mapping[str, Any]:
        """What the model is: format, parameters, context length, device, memory."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream the output; closing the iterator cancels the generation."""

    def batching(self) -> Mapping[str, Any] | None:
        """How the model batches requests now (slots, waiting requests, step counters), for
        status and metrics; ``None`` when it runs one request at a time."""
        return None

    async def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        raise NotImplementedError(f"model {self.info.get('name', '?')!r} does not embed")

    async def embed_counted(self, inputs: Sequence[str]
                            ) -> tuple[list[list[float]], list[int] | None]:
        """``embed``, and the tokens the model read of each input (``None`` when it cannot
        say); backends that tokenise anyway override it, so that usage costs nothing more."""
        return await self.embed(inputs), None

    @abc.abstractmethod
    async def close(self) -> None:
        """Free the model's memory. No method is called after this."""


class Backend(Driver):
    """Loads model files of the formats it claims."""

    kind = "backends"
    formats: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    async def load(self, spec: ModelSpec) -> LoadedModel:
        """Load ``spec`` or raise an error that names the model and the reason."""

    def estimate_memory(self, spec: ModelSpec) -> int:
        """Bytes of memory loading ``spec`` will take; the file's size unless a backend knows
        better (a KV cache, for example)."""
        return spec.path.stat().st_size


# --------------------------------------------------------------------------- protocols


class Protocol(Driver):
    """Puts the kernel in front of clients: starts serving in ``start``, stops in ``stop``.

    Protocols start last and stop first. A protocol wraps each request in
    ``kernel.admit()`` so that draining refuses new work and waits for the old.
    """

    kind = "protocols"

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...


# --------------------------------------------------------------------------- auth


@dataclass(frozen=True)
class Principal:
    """Who is calling, after authentication."""

    id: str
    roles: frozenset[str] = frozenset()
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Credentials:
    """What a request presented: headers (lower-case names) and the peer address. The
    headers never appear in its ``repr`` (nor so in logs and tracebacks): they may carry
    keys, tokens and cookies."""

    headers: Mapping[str, str] = field(repr=False)
    peer: str = ""


class AuthError(Exception):
    """Credentials a provider recognised as its own and found invalid (a revoked key, an
    expired token). The message is shown to the caller: it says what was wrong, never the
    secret itself."""


class AuthProvider(Driver):
    """Turns credentials into a principal."""

    kind = "auth"

    @abc.abstractmethod
    async def authenticate(self, credentials: Credentials) -> Principal | None:
        """Return the principal, ``None`` when these credentials are not for this provider,
        or raise :class:`AuthError` when they are for it and invalid."""


# --------------------------------------------------------------------------- cache


class CacheTier(Driver):
    """One tier of the response cache. Keys and values are bytes."""

    kind = "cache"

    @abc.abstractmethod
    async def get(self, key: bytes) -> bytes | None: ...

    @abc.abstractmethod
    async def put(self, key: bytes, value: bytes, ttl: float | None = None) -> None: ...

    @abc.abstractmethod
    async def delete(self, key: bytes) -> bool: ...

    @abc.abstractmethod
    async def clear(self) -> int:
        """Remove every entry and return how many there were."""

    @abc.abstractmethod
    def stats(self) -> Mapping[str, int]:
        """Hits, misses, evictions, bytes and entries."""


# --------------------------------------------------------------------------- exporters


class Exporter(Driver):
    """Sends what the kernel observes (events, metrics, traces) somewhere else."""

    kind = "exporters"


# --------------------------------------------------------------------------- schedulers


@dataclass(frozen=True)
class Job:
    """Periodic work: ``trigger`` is ``interval`` (``seconds``) or ``cron`` (``expression``)."""

    id: str
    func: Callable[[], Awaitable[None]]
    trigger: str
    seconds: float | None = None
    expression: str | None = None


class Scheduler(Driver):
    """Runs jobs on interval or cron triggers, never overlapping a job with itself."""

    kind = "schedulers"

    @abc.abstractmethod
    def add_job(self, job: Job) -> None: ...

    @abc.abstractmethod
    def remove_job(self, job_id: str) -> None: ...

    @abc.abstractmethod
    def jobs(self) -> Sequence[str]: ...


# --------------------------------------------------------------------------- repositories


@dataclass(frozen=True)
class PackageInfo:
    """A model package a repository offers."""

    name: str
    version: str
    format: str
    size: int | None = None
    sha256: str | None = None


class Repository(Driver):
    """A source of model packages."""

    kind = "repositories"

    @abc.abstractmethod
    async def search(self, query: str) -> Sequence[PackageInfo]: ...

    @abc.abstractmethod
    async def fetch(self, package: PackageInfo, destination: Path) -> Path:
        """Download ``package`` into ``destination`` and return the file's path."""


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Kind:
    """A driver kind: its config section, entry-point group and contract."""

    section: str
    contract: type[Driver]

    @property
    def group(self) -> str:
        return f"inferno.{self.section}"


#: Driver kinds in start order; the kernel stops them in reverse.
KINDS: tuple[Kind, ...] = (
    Kind("backends", Backend),
    Kind("repositories", Repository),
    Kind("cache", CacheTier),
    Kind("auth", AuthProvider),
    Kind("exporters", Exporter),
    Kind("schedulers", Scheduler),
    Kind("protocols", Protocol),
)
KINDS_BY_SECTION: Mapping[str, Kind] = {kind.section: kind for kind in KINDS}
HOOK_PLUGIN_GROUP = "inferno.plugins"
