"""What flows through the pipeline: a :class:`Call` in, a :class:`Reply` out.

A call is protocol-neutral: ``operation`` names what is asked (``chat``,
``completion``, ``embeddings``, ``models.list`` ...) and ``body`` holds the fields
in the OpenAI API's shape, whichever protocol carried them. A reply is either a
value (:class:`ValueReply`) or a stream of :class:`Delta` ending in a
:class:`Final` (:class:`StreamReply`); a client that wants no stream collects it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from inferno.kernel import Credentials, Principal


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex


@dataclass
class Call:
    """One request on its way through the middlewares to the gateway."""

    operation: str
    body: Mapping[str, Any] = field(default_factory=dict)
    #: Which protocol carried it: ``http``, ``ollama``, ``websocket``, ``stdin``.
    protocol: str = ""
    id: str = field(default_factory=new_id)
    credentials: Credentials = field(default_factory=lambda: Credentials(headers={}))
    #: Set by an authentication middleware; ``None`` while nobody vouched for the caller.
    principal: Principal | None = None
    #: What the call needs (see ``permissions``): the operation's unless a protocol set one
    #: for the ``access`` operation (a route or a message that runs no model work).
    permission: str | None = None
    received: float = field(default_factory=time.perf_counter)
    #: Scratch space for middlewares (a cache key, a span, a rate-limit bucket).
    state: dict[str, Any] = field(default_factory=dict)
    #: What the client is told about how the call was served (``{"cache": "hit"}``): HTTP
    #: sends each as an ``X-Inferno-<Key>`` header, WebSocket and stdin as result fields.
    meta: dict[str, str] = field(default_factory=dict)
    #: When each step happened (``time.perf_counter()``): ``admitted``, ``<middleware>.start``
    #: and ``.end``, ``queue.start``, ``queue.end``, ``load.start``, ``load.end``,
    #: ``first_token``, ``done``; for metrics and traces.
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    @property
    def model(self) -> str | None:
        """The model the body names, if it is an object that names one (middlewares run before
        the body is checked)."""
        value = self.body.get("model") if isinstance(self.body, Mapping) else None
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    #: The arguments as a JSON text, as OpenAI's API carries them.
    arguments: str


@dataclass(frozen=True)
class Delta:
    """Text the model produced since the last delta."""

    text: str
    tokens: int = 0


@dataclass(frozen=True)
class Final:
    """The end of a generation: why it stopped, what it cost, and any tool calls."""

    finish_reason: str
    usage: Mapping[str, Any]
    tool_calls: tuple[ToolCall, ...] = ()


class Reply(Protocol):
    """What a call returns. ``model`` is the model's registered name."""

    model: str
    created: int


@dataclass
class ValueReply:
    """A complete answer: a model list, embeddings, a status."""

    value: Any
    model: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


class StreamReply:
    """A generation: iterate for :class:`Delta` items and a last :class:`Final`.

    ``start()`` waits for the request's turn and the model's first output, so that an
    error found only then (a prompt too long for the context) can still be answered
    with a status before a protocol commits to a stream; iterating starts it if needed.
    ``aclose()`` (or leaving the iteration) cancels the generation within a decode step.
    """

    def __init__(self, model: str, events: AsyncIterator[Delta | Final], *,
                 kind: str = "chat") -> None:
        self.model = model
        self.kind = kind
        self.created = int(time.time())
        self._events = events
        self._first: Delta | Final | None = None
        self._started = False
        self._closing: list[Callable[[], Awaitable[None] | None]] = []
        self.final: Final | None = None
        #: Tokens of the deltas handed out so far (what a reply closed early has cost).
        self.streamed_tokens = 0
        #: The error that ended the stream early, if one did (a queue timeout, a backend
        #: failure): metrics and traces read it when the reply closes.
        self.error: Exception | None = None

    def on_close(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``callback`` once the reply is done with: iterated to the end, or closed
        (even before it started: its place in the queue is given back)."""
        self._closing.append(callback)

    async def start(self) -> None:
        if not self._started:
            self._started = True
            try:
                self._first = await anext(self._events, None)
            except Exception as exc:
                self.error = exc
                raise

    async def __aiter__(self) -> AsyncIterator[Delta | Final]:
        try:
            await self.start()
            if self._first is not None:
                first, self._first = self._first, None
                yield self._remember(first)
            async for event in self._events:
                yield self._remember(event)
        except Exception as exc:  # noted for whoever reports the call when it closes
            self.error = exc
            raise
        await self._closed()

    def _remember(self, event: Delta | Final) -> Delta | Final:
        if isinstance(event, Final):
            self.final = event
        else:
            self.streamed_tokens += event.tokens
        return event

    async def collect(self) -> tuple[str, Final]:
        """The whole text and the final event."""
        parts = []
        async for event in self:
            if isinstance(event, Delta):
                parts.append(event.text)
        assert self.final is not None, "a generation always ends with a Final event"
        return "".join(parts), self.final

    async def aclose(self) -> None:
        try:
            close = getattr(self._events, "aclose", None)
            if close is not None:
                await close()
        finally:
            await self._closed()

    async def _closed(self) -> None:
        callbacks, self._closing = self._closing, []
        for callback in reversed(callbacks):
            result = callback()
            if result is not None:
                await result


Handler = Callable[[Call], Awaitable[Any]]
#: What serves a call: ``async def operation(call) -> ValueReply | StreamReply``.
Operation = Handler


class Middleware(Protocol):
    """Wraps every call: ``return await handler(call)`` to go on, raise ``ApiError`` to refuse.

    ``order`` places it: lower runs first (outermost). Inferno's own use 100
    (observability), 200 (authentication), 300 (rate limits), 400 (the response cache).
    """

    order: int

    async def __call__(self, call: Call, handler: Handler) -> Any: ...
