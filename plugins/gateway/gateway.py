"""The gateway: one pipeline for every protocol.

``await gateway.run(call)`` passes the call through the middlewares plugins
contribute (``inferno_request_middleware``), then to the operation it names.
Generation replies are lazy: ``run`` returns once the request is checked and has
its place in the model's queue; the turn, the model and the tokens come while the
reply is iterated.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, aclosing
from typing import Any

import structlog

from inferno.kernel import GenerationRequest, KernelHandle, Principal

from .batching import EmbeddingBatcher
from .bodies import EmbeddingPlan, GenerationPlan, parse_chat, parse_completion, parse_embeddings
from .calls import Call, Delta, Final, Handler, Middleware, Operation, StreamReply, ValueReply
from .errors import ApiError, as_api_errors, invalid
from .queues import Queues
from .tools import rewrite_turns


class Gateway:
    """Runs calls; offered to protocols as ``kernel.service("gateway")``."""

    def __init__(self, kernel: KernelHandle, config: Mapping[str, Any],
                 middlewares: list[Middleware], log: structlog.typing.FilteringBoundLogger
                 ) -> None:
        self.kernel = kernel
        self.config = config
        self.log = log
        self.started = time.time()
        self.queues = Queues(concurrency=int(config["concurrency"]),
                             limit=int(config["queue_limit"]),
                             timeout=float(config["queue_timeout"]),
                             retry_after=float(config["retry_after"]))
        self.batcher = EmbeddingBatcher(
            self.queues, lambda model, keep: self.models.use(model, keep_alive=keep),
            int(config["embedding_batch"]), float(config["embedding_batch_window"]))
        self.middlewares = sorted(middlewares, key=lambda m: getattr(m, "order", 500))
        self.operations: dict[str, Operation] = {}
        #: The permission each operation needs (``permissions.PERMISSIONS``).
        self.permissions: dict[str, str] = {}
        for name, operation, permission in (
                ("chat", self._chat, "infer"), ("completion", self._completion, "infer"),
                ("embeddings", self._embeddings, "embed"),
                ("models.list", self._models_list, "models:read"),
                ("models.get", self._models_get, "models:read"),
                ("models.load", self._models_load, "models:manage"),
                ("models.unload", self._models_unload, "models:manage"),
                ("models.rollback", self._models_rollback, "models:manage"),
                ("status", self._status, "metrics:read"),
                ("access", self._access, "")):
            self.add_operation(name, operation, permission=permission)
        self._chain: Handler = self._build_chain()

    # ------------------------------------------------------------------ pipeline

    async def close(self) -> None:
        """Wait for embedding batches still running (their callers may have left)."""
        await self.batcher.close()

    def add_operation(self, name: str, operation: Operation, *, permission: str) -> None:
        """Let a plugin serve a new operation through the same middlewares, for callers whose
        roles grant ``permission``."""
        if name in self.operations:
            raise ValueError(f"operation {name!r} is already served")
        self.operations[name] = operation
        self.permissions[name] = permission

    async def run(self, call: Call) -> Any:
        """The call's reply, or ``ApiError`` (any other exception is a bug, logged by the
        protocol that turns it into a 500)."""
        stack = AsyncExitStack()
        if call.permission is None or call.operation != "access":
            call.permission = self.permissions.get(call.operation)
        try:
            with as_api_errors():
                if call.operation != "access":  # a check, no work: not held back by a drain
                    await stack.enter_async_context(self.kernel.admit())
                call.mark("admitted")
                reply = await self._chain(call)
        except BaseException:
            made = call.state.get("reply")  # a middleware failed after the stream was made:
            if isinstance(made, StreamReply):  # give its queue place back
                await made.aclose()
            await stack.aclose()
            raise
        if isinstance(reply, StreamReply):
            reply.on_close(stack.aclose)  # a stream is in flight until it is done with
        else:
            await stack.aclose()
        return reply

    def _build_chain(self) -> Handler:
        handler: Handler = self._dispatch
        for middleware in reversed(self.middlewares):
            handler = _wrap(middleware, handler)
        return handler

    async def _dispatch(self, call: Call) -> Any:
        operation = self.operations.get(call.operation)
        if operation is None:
            raise ApiError(404, f"unknown operation {call.operation!r}; known: "
                                f"{', '.join(sorted(self.operations))}", code="unknown_operation")
        return await operation(call)

    @property
    def models(self) -> Any:
        return self.kernel.service("models")

    # ------------------------------------------------------------------ generation

    async def _chat(self, call: Call) -> StreamReply:
        return await self.generate(call, parse_chat(call.body))

    async def _completion(self, call: Call) -> StreamReply:
        return await self.generate(call, parse_completion(call.body))

    async def generate(self, call: Call, plan: GenerationPlan) -> StreamReply:
        """Check the plan, take a place in the model's queue and return the lazy reply."""
        entry = self.models.entry(plan.model)  # ModelNotFound → 404 before any queueing
        if entry.unavailable:
            raise ApiError(503, f"model {entry.name!r} is unavailable: {entry.unavailable}",
                           param="model", code="model_unavailable")
        call.state["plan"] = plan
        params = dict(plan.params)
        messages = plan.messages
        if plan.tools is not None and plan.tools.active and messages is not None:
            messages = plan.tools.prepare(messages)
            params["response_format"], params["schema"] = "json_schema", plan.tools.schema()
        elif messages is not None:
            messages = rewrite_turns(messages)
        owner = call.principal.id if call.principal is not None else ""
        request = GenerationRequest(request_id=call.id, prompt=plan.prompt, messages=messages,
                                    params=params, owner=owner)
        ticket = self.queues.enter(entry.name, self.priority(call.principal))
        events = self._generate(entry.name, plan, request, ticket, call)
        reply = StreamReply(entry.name, events, kind=plan.kind)
        reply.on_close(ticket.release)  # also when it is closed before it started
        call.state["reply"] = reply
        return reply

    def priority(self, principal: Principal | None) -> int:
        """The highest priority of the caller's roles (``priorities``), else 0."""
        priorities: Mapping[str, int] = self.config["priorities"]
        if principal is None or not priorities:
            return 0
        return max((int(priorities[role]) for role in principal.roles if role in priorities),
                   default=0)

    async def _generate(self, model: str, plan: GenerationPlan, request: GenerationRequest,
                        ticket: Any, call: Call) -> AsyncIterator[Delta | Final]:
        try:
            with as_api_errors():
                async with aclosing(self._events(model, plan, request, ticket, call)) as events:
                    async for event in events:
                        yield event
        finally:
            ticket.release()

    async def _events(self, model: str, plan: GenerationPlan, request: GenerationRequest,
                      ticket: Any, call: Call) -> AsyncIterator[Delta | Final]:
        async with AsyncExitStack() as stack:
            call.mark("queue.start")
            waited = await stack.enter_async_context(ticket.turn())
            call.mark("queue.end")
            loading = time.perf_counter()
            call.marks["load.start"] = loading
            loaded = await stack.enter_async_context(
                self.models.use(model, keep_alive=plan.keep_alive))
            call.mark("load.end")
            self.queues.resize(model, loaded.concurrency or self.queues.concurrency)
            load_seconds = call.marks["load.end"] - loading
            tools = plan.tools if plan.tools is not None and plan.tools.active else None
            parts: list[str] = []
            generation = loaded.generate(request)
            stack.push_async_callback(generation.aclose)
            async for chunk in generation:
                if chunk.text:
                    call.marks.setdefault("first_token", time.perf_counter())
                    if tools is not None:
                        parts.append(chunk.text)  # a tool answer is one JSON value
                    else:
                        yield Delta(chunk.text, chunk.tokens)
                if chunk.finish_reason is not None:
                    call.mark("done")
                    usage = dict(chunk.usage or {})
                    # the gateway's queue, then the model's own (a batching model's slots)
                    waited_in_model = float(usage.get("queue_seconds") or 0.0)
                    usage = {**usage, "queue_seconds": round(waited + waited_in_model, 6),
                             "load_seconds": round(load_seconds, 6)}
                    reason = chunk.finish_reason
                    if tools is None:
                        yield Final(reason, usage)
                        return
                    content, calls = tools.parse("".join(parts))
                    if content:
                        yield Delta(content)
                    yield Final("tool_calls" if calls else reason, usage, calls)
                    return
            raise ApiError(500, "the backend ended without a final chunk",
                           code="internal_error")

    # ------------------------------------------------------------------ embeddings

    async def _embeddings(self, call: Call) -> ValueReply:
        plan = parse_embeddings(call.body)
        entry = self.models.entry(plan.model)
        if entry.unavailable:
            raise ApiError(503, f"model {entry.name!r} is unavailable: {entry.unavailable}",
                           param="model", code="model_unavailable")
        call.state["plan"] = plan
        done = await self.batcher.embed(entry.name, plan.inputs, plan.keep_alive)
        call.mark("done")
        vectors, waited = done.vectors, done.waited
        tokens = done.tokens
        if tokens is None:
            tokens = _count_tokens(self.models.residents.get(entry.name), plan.inputs)
        dimensions = plan.extra.get("dimensions")
        if dimensions is not None and vectors and dimensions != len(vectors[0]):
            raise invalid(f"dimensions {dimensions} is not this model's: {entry.name!r} makes "
                          f"{len(vectors[0])}-dimensional embeddings", "dimensions")
        result = _embedding_result(vectors, plan, tokens, waited)
        call.state["usage"] = result.get("usage")
        return ValueReply(result, model=entry.name)

    # ------------------------------------------------------------------ models and status

    async def _models_list(self, call: Call) -> ValueReply:
        return ValueReply(self.models.status())

    async def _models_get(self, call: Call) -> ValueReply:
        name = _name(call)
        entry = self.models.entry(name)
        row = next(r for r in self.models.status() if r["name"] == entry.name)
        resident = self.models.residents.get(entry.name)
        details: dict[str, Any] = {**row}
        if resident is not None:
            details["info"] = _jsonable(resident.current.model.info)
        else:
            try:  # reading a header is file I/O: off the event loop
                described = await asyncio.to_thread(self.models.describe, entry.name)
                details["format"] = described.format
                details["size"] = described.size
                details["metadata"] = _jsonable(described.metadata)
            except Exception as exc:  # a broken file is shown, not raised
                details["problem"] = str(exc)
        return ValueReply(details, model=entry.name)

    async def _models_load(self, call: Call) -> ValueReply:
        name = _name(call)
        entry = self.models.entry(name)
        started = time.perf_counter()
        resident = await self.models.load(entry.name)
        keep = call.body.get("keep_alive")
        if keep is not None:
            from .bodies import parse_keep_alive

            resident.keep_alive = parse_keep_alive(keep)
        return ValueReply({"name": entry.name, "loaded": True,
                           "seconds": round(time.perf_counter() - started, 3),
                           "info": _jsonable(resident.current.model.info)}, model=entry.name)

    async def _models_unload(self, call: Call) -> ValueReply:
        name = _name(call)
        entry = self.models.entry(name)
        unloaded = await self.models.unload(entry.name)
        return ValueReply({"name": entry.name, "unloaded": unloaded}, model=entry.name)

    async def _models_rollback(self, call: Call) -> ValueReply:
        name = _name(call)
        entry = self.models.entry(name)
        resident = self.models.residents.get(entry.name)
        if resident is None or resident.previous is None:
            state = "is not loaded" if resident is None else "has no previous version"
            raise ApiError(409, f"cannot roll back {entry.name!r}: it {state}; a rollback "
                                f"returns to the version a hot swap replaced",
                           param="model", code="rollback_unavailable")
        await self.models.rollback(entry.name)
        return ValueReply({"name": entry.name, "rolled_back": True}, model=entry.name)

    async def _access(self, call: Call) -> ValueReply:
        """Nothing to do: a protocol asks whether the caller may use a route or a message
        that runs no model work (``call.permission`` says what it needs)."""
        if not call.permission:
            raise ApiError(500, "an access check must say which permission it needs",
                           code="internal_error")
        return ValueReply(None)

    async def _status(self, call: Call) -> ValueReply:
        return ValueReply(self.status())

    def status(self) -> dict[str, Any]:
        from importlib.metadata import version

        loaded = []
        for name, resident in sorted(self.models.residents.items()):
            model = resident.current.model
            info = model.info
            row = {"name": name, "format": info.get("format"),
                   "memory_bytes": info.get("memory_bytes") or resident.current.reservation.amount,
                   "device": info.get("device"), "inflight": resident.current.inflight,
                   "keep_alive": resident.keep_alive}
            if (batching := model.batching()) is not None:
                row["batching"] = dict(batching)
            loaded.append(row)
        return {"version": version("inferno"), "state": self.kernel.state,
                "uptime_seconds": round(time.time() - self.started, 3), "loaded": loaded,
                "queues": self.queues.stats()}


def _wrap(middleware: Middleware, handler: Handler) -> Handler:
    label = getattr(middleware, "name", type(middleware).__name__)

    async def wrapped(call: Call) -> Any:
        call.mark(f"{label}.start")
        try:
            return await middleware(call, handler)
        finally:
            call.mark(f"{label}.end")
    return wrapped


def _name(call: Call) -> str:
    name = call.body.get("model") or call.body.get("name")
    if not isinstance(name, str) or not name:
        raise invalid("a model name is required", "model")
    return name


def _count_tokens(resident: Any, inputs: Any) -> int:
    """Tokens of ``inputs`` for a backend whose ``embed_counted`` does not count them."""
    counter = getattr(resident.current.model, "count_tokens", None) if resident else None
    if counter is None:
        return 0
    return sum(int(counter(text)) for text in inputs)


def _embedding_result(vectors: list[list[float]], plan: EmbeddingPlan, tokens: int,
                      waited: float) -> dict[str, Any]:
    data = []
    for index, vector in enumerate(vectors):
        value: Any = vector
        if plan.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {"data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "queue_seconds": round(waited, 6)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
