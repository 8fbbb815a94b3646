"""The Ollama-compatible API under ``/api``, so that Ollama's clients work against Inferno.

Each route turns Ollama's body into the gateway's (OpenAI-shaped) body and runs it
through the same pipeline as every other protocol, with ``protocol="ollama"``; the
translation of bodies and model facts is in :mod:`.ollama_bodies`. Replies come back
in Ollama's shapes: NDJSON streams whose last object carries the token counts and
durations in nanoseconds, and errors as ``{"error": "message"}`` with the status code,
which is what Ollama's clients read (not the OpenAI envelope the other routes use).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from inferno.plugins.gateway.bodies import require_object
from inferno.plugins.gateway.calls import Delta, Final, StreamReply
from inferno.plugins.gateway.errors import ApiError, from_exception, invalid
from inferno.plugins.gateway.permissions import public, requires, runs

from . import ollama_bodies as bodies
from .ollama_bodies import rfc3339
from .web import MAX_BODY_SIZE, Server, json_response, read_json, since, stream_reply

NDJSON = "application/x-ndjson"
#: Seconds a stream waits for its first token before its headers go out. Ollama's clients
#: parse every line as JSON, so nothing can be written while a request is queued; like
#: Ollama, the status is sent with the first token, and an error found while waiting (a
#: full queue, a prompt too long) keeps its status. The gateway's queue timeout bounds it.
_HEADERS_AFTER = 24 * 3600.0


def routes(server: Server) -> list[web.RouteDef]:
    api = OllamaApi(server)
    return [
        web.get("/api/version", api.version),
        web.get("/api/tags", api.tags),
        web.post("/api/show", api.show),
        web.get("/api/ps", api.ps),
        web.post("/api/generate", api.generate),
        web.post("/api/chat", api.chat),
        web.post("/api/embed", api.embed),
        web.post("/api/embeddings", api.embeddings),
        *[web.post(f"/api/{name}", api.unsupported) for name in ("pull", "push", "create",
                                                                   "copy")],
        web.delete("/api/delete", api.unsupported),
    ]


def ollama_errors(handler: Callable[[OllamaApi, web.Request], Awaitable[web.StreamResponse]]
                  ) -> Callable[[OllamaApi, web.Request], Awaitable[web.StreamResponse]]:
    """Every failure as ``{"error": "message"}`` with its status, the body Ollama's clients
    turn into ``ResponseError(error, status_code)``."""

    @functools.wraps(handler)
    async def wrapped(self: OllamaApi, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = (f"the request body is larger than this server accepts "
                       f"({request.app[MAX_BODY_SIZE]} bytes, protocols.http.max_body_size)"
                       if exc.status == 413
                       else exc.text or exc.reason)
            return _error(ApiError(exc.status, message))
        except Exception as exc:
            error = from_exception(exc)
            if error.status >= 500 and not isinstance(exc, ApiError):
                self.server.log.exception("request failed", error=str(exc))
            return _error(error)

    return wrapped


def _error(error: ApiError) -> web.Response:
    headers = {} if error.retry_after is None else {
        "Retry-After": str(max(1, round(error.retry_after)))}
    return web.json_response({"error": error.message}, status=error.status, headers=headers)


class OllamaApi:
    """The ``/api`` handlers."""

    def __init__(self, server: Server) -> None:
        self.server = server

    @property
    def models(self) -> Any:
        return self.server.kernel.service("models")

    async def run(self, request: web.Request, operation: str, body: Mapping[str, Any]) -> Any:
        return await self.server.gateway.run(
            self.server.call(request, operation, body, protocol="ollama"))

    # ------------------------------------------------------------------ models

    @public
    @ollama_errors
    async def version(self, request: web.Request) -> web.Response:
        """Inferno's version: what Ollama's clients ask to see that a server answers."""
        return json_response({"version": importlib.metadata.version("inferno")})

    @runs("models.list")
    @ollama_errors
    async def tags(self, request: web.Request) -> web.Response:
        """The models that can be served, with their file's size, date and details; models
        whose file is missing or unreadable are left out (``/api/v1/models`` says why)."""
        rows = (await self.run(request, "models.list", {})).value
        models = []
        for row in rows:
            if row.get("unavailable") or not row.get("path"):
                continue
            try:
                facts = await asyncio.to_thread(bodies.facts, self.models, row["name"])
            except Exception as exc:
                self.server.log.debug("model left out of /api/tags", model=row["name"],
                                      reason=str(exc))
                continue
            models.append(bodies.listing(row["name"], facts))
        return json_response({"models": models})

    @runs("models.get")
    @ollama_errors
    async def show(self, request: web.Request) -> web.Response:
        """One model's details, header metadata (``model_info``), parameters and
        capabilities."""
        body = bodies.checked(await read_json(request), bodies.SHOW_FIELDS)
        name = bodies.model_name(self.models, body.get("model") or body.get("name"))
        reply = await self.run(request, "models.get", {"model": name})
        facts = await asyncio.to_thread(bodies.facts, self.models, reply.model)
        return json_response(bodies.shown(self.models.entry(reply.model), facts))

    @runs("status")
    @ollama_errors
    async def ps(self, request: web.Request) -> web.Response:
        """The loaded models: memory held (``size``, and ``size_vram`` on a GPU), when they
        will be unloaded if left idle (``expires_at``) and their context length."""
        status = (await self.run(request, "status", {})).value
        models = []
        for row in status.get("loaded", ()):
            resident = self.models.residents.get(row["name"])
            if resident is None:
                continue  # unloaded since the status was taken
            facts = await asyncio.to_thread(bodies.facts, self.models, row["name"])
            models.append(bodies.process(row, resident, facts))
        return json_response({"models": models})

    @requires("models:manage")
    @ollama_errors
    async def unsupported(self, request: web.Request) -> web.Response:
        """Ollama's model management (pull, push, create, copy, delete): not Inferno's way;
        answered with 501 and where models are registered instead."""
        raise ApiError(501, f"{request.method} {request.path} is not supported: Inferno serves "
                            f"the models registered in its profile (plugins.models.entries) "
                            f"or with `inferno models add`; see GET /api/tags")

    # ------------------------------------------------------------------ generation

    @runs("completion", "chat", "models.load", "models.unload")
    @ollama_errors
    async def generate(self, request: web.Request) -> web.StreamResponse:
        """A completion of ``prompt``: through the model's chat template (with ``system``)
        unless ``raw`` is true. Streams NDJSON unless ``stream`` is false; an empty prompt
        loads the model (``keep_alive: 0`` unloads it)."""
        started = time.perf_counter()
        body = require_object(await read_json(request))
        operation, call_body = bodies.generate_call(self.models, body)
        return await self._generation(request, body, operation, call_body, started=started,
                                      shape=lambda text: {"response": text})

    @runs("chat", "models.load", "models.unload")
    @ollama_errors
    async def chat(self, request: web.Request) -> web.StreamResponse:
        """The assistant's next message for ``messages``, with ``tools`` called as objects.
        Streams NDJSON unless ``stream`` is false; no messages loads the model
        (``keep_alive: 0`` unloads it)."""
        started = time.perf_counter()
        body = require_object(await read_json(request))
        operation, call_body = bodies.chat_call(self.models, body)
        return await self._generation(
            request, body, operation, call_body, started=started,
            shape=lambda text: {"message": {"role": "assistant", "content": text}})

    async def _generation(self, request: web.Request, body: Mapping[str, Any],
                          operation: str, call_body: dict[str, Any], *, started: float,
                          shape: Callable[[str], dict[str, Any]]) -> web.StreamResponse:
        stream = bodies.stream_of(body)
        head = {"model": body["model"]}
        if operation in ("models.load", "models.unload"):
            await self.run(request, operation, call_body)
            reason = operation.split(".")[1]
            return json_response({**head, "created_at": rfc3339(), **shape(""), "done": True,
                                  "done_reason": reason})
        reply: StreamReply = await self.run(request, operation, call_body)
        if stream:
            frames = self._frames(head, shape, started)
            return await stream_reply(request, reply, frames, content_type=NDJSON,
                                      keepalive=None, interval=_HEADERS_AFTER)
        try:
            text, final = await reply.collect()
        finally:
            await reply.aclose()
        last = {**head, "created_at": rfc3339(), **shape(text)}
        _add_tool_calls(last, final)
        return json_response({**last, **bodies.final_fields(final, started)})

    def _frames(self, head: Mapping[str, Any], shape: Callable[[str], dict[str, Any]],
                started: float) -> Callable[[AsyncIterator[Delta | Final]],
                                            AsyncIterator[bytes]]:
        """One JSON object a line: a chunk per piece of text, tool calls in a chunk of
        their own, then the final object with the counts and durations."""

        async def frames(events: AsyncIterator[Delta | Final]) -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    if isinstance(event, Delta):
                        if event.text:
                            yield _line({**head, "created_at": rfc3339(), **shape(event.text),
                                         "done": False})
                        continue
                    if event.tool_calls:
                        chunk = {**head, "created_at": rfc3339(), **shape(""), "done": False}
                        _add_tool_calls(chunk, event)
                        yield _line(chunk)
                    yield _line({**head, "created_at": rfc3339(), **shape(""),
                                 **bodies.final_fields(event, started)})
            except ConnectionResetError:
                raise
            except Exception as exc:  # after the stream opened: an error object, Ollama's way
                error = from_exception(exc)
                if error.status >= 500 and not isinstance(exc, ApiError):
                    self.server.log.exception("stream failed", error=str(exc))
                yield _line({"error": error.message})

        return frames

    # ------------------------------------------------------------------ embeddings

    @runs("embeddings", "models.load")
    @ollama_errors
    async def embed(self, request: web.Request) -> web.Response:
        """Embeddings of ``input`` (a string or a list of strings), one unit vector each;
        an empty list loads the model."""
        started = time.perf_counter()
        body = bodies.checked(await read_json(request), bodies.EMBED_FIELDS)
        call_body = bodies.embed_call(self.models, body, body.get("input"))
        if call_body.get("input") == []:
            await self.run(request, "models.load", call_body)
            return json_response({"model": body["model"], "embeddings": []})
        value = (await self.run(request, "embeddings", call_body)).value
        return json_response({
            "model": body["model"], "embeddings": [row["embedding"] for row in value["data"]],
            "total_duration": bodies.nanoseconds(since(started)),
            "prompt_eval_count": value["usage"]["prompt_tokens"]})

    @runs("embeddings")
    @ollama_errors
    async def embeddings(self, request: web.Request) -> web.Response:
        """The older embeddings route: one ``prompt``, one ``embedding``."""
        body = bodies.checked(await read_json(request), bodies.EMBEDDINGS_FIELDS)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise invalid(f"prompt must be a string, got {bodies.kind(prompt)}", "prompt")
        value = (await self.run(request, "embeddings",
                                bodies.embed_call(self.models, body, prompt))).value
        return json_response({"embedding": value["data"][0]["embedding"]})


def _add_tool_calls(chunk: dict[str, Any], final: Final) -> None:
    """Tool calls in the message, with their arguments as an object, as Ollama sends them."""
    if final.tool_calls and "message" in chunk:
        chunk["message"]["tool_calls"] = [
            {"id": call.id, "function": {"index": index, "name": call.name,
                                         "arguments": json.loads(call.arguments)}}
            for index, call in enumerate(final.tool_calls)]


def _line(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
