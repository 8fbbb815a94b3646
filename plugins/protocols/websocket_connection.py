"""One WebSocket connection of the ``websocket`` protocol: its messages, its requests in
flight by id, and the kernel events it subscribed to."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, WSMsgType, web

from inferno.kernel import Credentials, Event, Subscription
from inferno.kernel.logs import request_context
from inferno.plugins.gateway.bodies import loads
from inferno.plugins.gateway.calls import Call, Delta, StreamReply
from inferno.plugins.gateway.errors import ApiError, from_exception, invalid
from inferno.plugins.gateway.permissions import AUTHENTICATED

if TYPE_CHECKING:
    from .websocket import WebSocketProtocol

#: Message types that become gateway calls (the operation has the same name).
OPERATIONS = ("chat", "completion", "embeddings")
#: What the other message types need; each is checked through the gateway (an ``access``
#: call) with the connection's credentials, so a key revoked mid-connection stops working.
MESSAGE_PERMISSIONS = {"cancel": AUTHENTICATED, "subscribe": "events:read",
                       "unsubscribe": AUTHENTICATED, "ping": AUTHENTICATED}
#: Events one connection may have waiting for a slow client before the oldest are dropped.
EVENT_QUEUE = 256
#: Topics (names or patterns) one connection may be subscribed to at once: each event is
#: matched against every one of them.
MAX_TOPICS = 64
#: Seconds between two checks of a subscriber's credentials while events flow.
RECHECK_SECONDS = 1.0


@dataclasses.dataclass(eq=False)
class InFlight:
    """One request of a connection, from its message until its last frame is on its way."""

    id: str | int
    task: asyncio.Task[None] | None = None
    #: Tokens streamed so far (the usage of a cancelled reply).
    tokens: int = 0
    #: Set by the client's cancel: the reply ends with done/"cancelled", not an error.
    cancelled: bool = False
    #: Whether the task began; one cancelled before it began never runs its body.
    started: bool = False
    #: What the gateway told the client about the call (``{"cache": "hit"}``): in ``done``.
    meta: dict[str, str] = dataclasses.field(default_factory=dict)


class Connection:
    """One client: its in-flight requests by id, its topics, one writer at a time."""

    def __init__(self, protocol: WebSocketProtocol, ws: web.WebSocketResponse,
                 caller: Credentials) -> None:
        self.protocol = protocol
        self.ws = ws
        self.credentials = caller
        self.inflight: dict[str | int, InFlight] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.topics: set[str] = set()
        #: When the credentials were last found good, for relaying events.
        self.checked = time.monotonic()
        self.subscription: Subscription | None = None
        self._writing = asyncio.Lock()

    async def serve(self) -> None:
        async for message in self.ws:
            if message.type is WSMsgType.TEXT:
                await self.receive(message.data)
            elif message.type is WSMsgType.BINARY:
                await self.refuse(None, ApiError(
                    400, "binary frames are not part of this protocol; send JSON as text "
                         "frames", code="binary_frame"))
            elif message.type is WSMsgType.ERROR:  # too large (1009), not UTF-8 (1007)...
                break

    async def receive(self, text: str) -> None:
        """One frame: a message answered by frames; a bad one gets an error frame."""
        message_id = None
        try:
            message = _parse(text)
            message_id = _optional_id(message)
            handler = _handler(message)
            if message["type"] not in OPERATIONS:
                await self.protocol.gateway.run(Call(
                    "access", protocol="websocket", credentials=self.credentials,
                    permission=MESSAGE_PERMISSIONS[message["type"]],
                    state={"message": message["type"]}))
            await handler(self, message)
        except ApiError as exc:
            await self.refuse(message_id, exc)
        except Exception as exc:  # a bug: logged and answered; the connection serves on
            self.protocol.log.exception("message failed", error=str(exc))
            await self.refuse(message_id, from_exception(exc))

    # ------------------------------------------------------------------ requests

    async def begin(self, message: Mapping[str, Any]) -> None:
        message_id = _required_id(message)
        if message_id in self.inflight:
            raise ApiError(400, f"a request with id {message_id!r} is already in flight on this "
                                f"connection; give each request its own id", param="id",
                           code="duplicate_id")
        limit = self.protocol.max_inflight
        if len(self.inflight) >= limit:
            raise ApiError(429, f"this connection has {limit} requests in flight, the most it "
                                f"may (protocols.websocket.max_inflight); wait for a done "
                                f"frame or cancel one", code="too_many_requests")
        body = {key: value for key, value in message.items() if key not in ("type", "id")}
        request = InFlight(message_id)
        request.task = asyncio.create_task(self.answer(request, message["type"], body))
        self.inflight[message_id] = request
        self.tasks.add(request.task)
        request.task.add_done_callback(self.tasks.discard)

    async def answer(self, request: InFlight, operation: str, body: dict[str, Any]) -> None:
        request.started = True
        call = Call(operation, body, protocol="websocket", credentials=self.credentials)
        request.meta = call.meta
        with request_context(call.id, protocol="websocket", message_id=request.id):
            try:
                reply = await self.protocol.gateway.run(call)
                if isinstance(reply, StreamReply):
                    await self.stream(request, reply, body.get("stream", True) is not False)
                else:
                    self._finish(request)
                    await self.send({"type": "done", "id": request.id, "model": reply.model,
                                     **_value_frame(reply.value), **request.meta})
            except asyncio.CancelledError:
                if not request.cancelled:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                await self._cancelled(request)
            except Exception as exc:
                error = from_exception(exc)
                if error.status >= 500 and not isinstance(exc, ApiError):
                    self.protocol.log.exception("request failed", error=str(exc))
                self._finish(request)
                await self.refuse(request.id, error)
            finally:
                self._finish(request)

    async def stream(self, request: InFlight, reply: StreamReply, stream: bool) -> None:
        """A delta frame per piece of text (or the whole text in done when not streaming)."""
        events = aiter(reply)
        parts: list[str] = []
        try:
            async for event in events:
                if isinstance(event, Delta):
                    request.tokens += event.tokens
                    if stream:
                        await self.send({"type": "delta", "id": request.id,
                                         "content": event.text})
                    else:
                        parts.append(event.text)
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            await reply.aclose()  # stops the generation within a decode step
        final = reply.final
        assert final is not None, "a generation always ends with a Final event"
        frame: dict[str, Any] = {"type": "done", "id": request.id, "model": reply.model,
                                 "finish_reason": final.finish_reason, "usage": dict(final.usage),
                                 **request.meta}
        if not stream:
            frame["content"] = "".join(parts)
        if final.tool_calls:
            frame["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": c.arguments}} for c in final.tool_calls]
        self._finish(request)
        await self.send(frame)

    def _finish(self, request: InFlight) -> None:
        """Forget the request before its last frame: a cancel that crosses that frame finds
        no request (and says so) rather than answering twice."""
        if self.inflight.get(request.id) is request:
            del self.inflight[request.id]

    async def cancel(self, message: Mapping[str, Any]) -> None:
        message_id = _required_id(message)
        request = self.inflight.get(message_id)
        if request is None or request.task is None:
            raise ApiError(404, f"no request with id {message_id!r} is in flight on this "
                                f"connection (it has finished, or was never sent)",
                           param="id", code="unknown_id")
        request.cancelled = True
        request.task.cancel()
        if not request.started:  # its body will never run to answer
            await self._cancelled(request)

    async def _cancelled(self, request: InFlight) -> None:
        self._finish(request)
        await self.send({"type": "done", "id": request.id, "finish_reason": "cancelled",
                         "usage": {"completion_tokens": request.tokens}})

    # ------------------------------------------------------------------ events

    async def subscribe(self, message: Mapping[str, Any]) -> None:
        topics = self.topics.union(_topics(message))
        if len(topics) > MAX_TOPICS:
            raise ApiError(400, f"this connection would be subscribed to {len(topics)} topics; "
                                f"the most is {MAX_TOPICS}: use patterns (\"model.*\") or "
                                f"unsubscribe from some first", param="topics",
                           code="too_many_topics")
        self.topics = topics
        if self.subscription is None:
            self.subscription = self.protocol.context.kernel.bus.subscribe(
                Event, self.relay, maxsize=EVENT_QUEUE)
        await self.send(_ack("subscribed", message, self.topics))

    async def unsubscribe(self, message: Mapping[str, Any]) -> None:
        self.topics.difference_update(_topics(message))
        if not self.topics and self.subscription is not None:
            self.subscription.cancel()
            self.subscription = None
        await self.send(_ack("unsubscribed", message, self.topics))

    async def relay(self, event: Event) -> None:
        if not any(fnmatchcase(event.topic, pattern) for pattern in self.topics):
            return
        now = time.monotonic()
        if now - self.checked >= RECHECK_SECONDS:  # a key revoked since: no more events
            try:
                await self.protocol.gateway.run(Call(
                    "access", protocol="websocket", credentials=self.credentials,
                    permission=AUTHENTICATED, state={"message": "event"}))
            except ApiError as exc:
                self.topics.clear()
                await self.refuse(None, exc)
                await self.ws.close(code=WSCloseCode.POLICY_VIOLATION,
                                    message=b"credentials no longer accepted")
                return
            self.checked = now
        await self.send({"type": "event", "topic": event.topic,
                         "data": dataclasses.asdict(event)})

    async def ping(self, message: Mapping[str, Any]) -> None:
        await self.send(_ack("pong", message))

    # ------------------------------------------------------------------ frames and closing

    async def send(self, frame: Mapping[str, Any]) -> None:
        """Write one frame; a client already gone is no error (its cleanup is under way)."""
        text = json.dumps(frame, ensure_ascii=False, separators=(",", ":"), default=str)
        async with self._writing:
            if not self.ws.closed:
                with contextlib.suppress(ConnectionResetError):
                    await self.ws.send_str(text)

    async def refuse(self, message_id: Any, error: ApiError) -> None:
        await self.send({"type": "error", "id": message_id, "error": {
            **error.envelope()["error"], "status": error.status}})

    async def shutdown(self, grace: float) -> None:
        """Kernel stop: let in-flight replies finish within ``grace``, then go away (1001)."""
        running = [request.task for request in self.inflight.values() if request.task]
        if running:
            await asyncio.wait(running, timeout=grace)
        await self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"Inferno is stopping")

    async def abandon(self) -> None:
        """The connection ended: cancel every reply still running and drop the topics."""
        if self.subscription is not None:
            self.subscription.cancel()
            self.subscription = None
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


HANDLERS: dict[str, Any] = {
    **{operation: Connection.begin for operation in OPERATIONS},
    "cancel": Connection.cancel, "subscribe": Connection.subscribe,
    "unsubscribe": Connection.unsubscribe, "ping": Connection.ping,
}


def _parse(text: str) -> dict[str, Any]:
    message = loads(text, "the frame")
    if not isinstance(message, dict):
        raise ApiError(400, f"a message must be a JSON object with a type, got "
                            f"{type(message).__name__}", code="invalid_message")
    return message


def _handler(message: Mapping[str, Any]) -> Any:
    """The method that answers a message of this ``type``."""
    kind = message.get("type")
    handler = HANDLERS.get(kind) if isinstance(kind, str) else None
    if handler is None:
        shown = repr(kind) if isinstance(kind, str | None) else f"a JSON {_kind(kind)}"
        raise ApiError(400, f"unknown message type {shown}; type must be one of: "
                            f"{', '.join(HANDLERS)}", param="type", code="unknown_type")
    return handler


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", bool: "boolean"}.get(type(value), "number")


def _optional_id(message: Mapping[str, Any]) -> str | int | None:
    value = message.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise invalid(f"id must be a non-empty string or an integer, got {value!r}", "id",
                      "invalid_id")
    return value


def _required_id(message: Mapping[str, Any]) -> str | int:
    value = _optional_id(message)
    if value is None:
        raise invalid(f"a {message['type']!r} message needs an id (a string or an integer, "
                      f"unique among this connection's requests in flight)", "id", "missing_id")
    return value


def _topics(message: Mapping[str, Any]) -> list[str]:
    topics = message.get("topics")
    if not isinstance(topics, list) or not topics or \
            not all(isinstance(t, str) and t for t in topics):
        raise invalid(f"topics must be a non-empty list of topic names or patterns "
                      f"(\"model.loaded\", \"model.*\"), got {topics!r}", "topics")
    return topics


def _ack(kind: str, message: Mapping[str, Any], topics: set[str] | None = None
         ) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": kind}
    if message.get("id") is not None:
        frame["id"] = message["id"]
    if topics is not None:
        frame["topics"] = sorted(topics)
    return frame


def _value_frame(value: Any) -> dict[str, Any]:
    """An embeddings result as ``data`` and ``usage`` (its queue wait counted in usage)."""
    if isinstance(value, Mapping) and "data" in value:
        usage = {**value.get("usage", {})}
        if "queue_seconds" in value:
            usage["queue_seconds"] = value["queue_seconds"]
        return {"data": value["data"], "usage": usage}
    return {"result": value}
