"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings``.

Handlers only translate: the body goes to the gateway as it came (the gateway checks
it and names the field at fault), and the reply comes back in the exact shapes of
OpenAI's API, so that its SDKs and the tools built on them work unchanged. Inferno's
own timing figures ride along under ``timings``, beside the standard ``usage``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from aiohttp import web

from inferno.plugins.gateway.bodies import require_object
from inferno.plugins.gateway.calls import Delta, Final, StreamReply, ToolCall, new_id
from inferno.plugins.gateway.permissions import runs

from .web import Server, json_response, read_json, stream_reply

#: The usage keys OpenAI's API defines; Inferno's other figures go under ``timings``.
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
SSE = "text/event-stream; charset=utf-8"
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"

Frames = Callable[[AsyncIterator[Delta | Final]], AsyncIterator[bytes]]


def routes(server: Server) -> list[web.RouteDef]:
    api = OpenAiRoutes(server)
    return [
        web.get("/v1/models", api.list_models),
        web.get("/v1/models/{id}", api.get_model),
        web.post("/v1/chat/completions", api.chat_completions),
        web.post("/v1/completions", api.completions),
        web.post("/v1/embeddings", api.embeddings),
    ]


class OpenAiRoutes:
    """The handlers, sharing the server and the fingerprint they stamp on replies."""

    def __init__(self, server: Server) -> None:
        self.server = server
        #: Which build answered: OpenAI uses it to say the backend changed.
        self.fingerprint = f"inferno-{version('inferno')}"

    # ------------------------------------------------------------------ models

    @runs("models.list")
    async def list_models(self, request: web.Request) -> web.Response:
        """List the registered models (aliases are shown on each; unavailable ones too,
        flagged, so a client sees what the profile offers and why one does not answer)."""
        reply = await self._run(request, "models.list", {})
        return json_response({"object": "list",
                              "data": [model_object(row) for row in reply.value]})

    @runs("models.get")
    async def get_model(self, request: web.Request) -> web.Response:
        """One model by name or alias; 404 with the error envelope for an unknown one."""
        reply = await self._run(request, "models.get", {"model": request.match_info["id"]})
        return json_response(model_object(reply.value))

    # ------------------------------------------------------------------ generation

    @runs("chat")
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """Chat completion, as one JSON object or as server-sent events (``stream``)."""
        return await self._generate(request, "chat", self._chat_object, self._chat_frames)

    @runs("completion")
    async def completions(self, request: web.Request) -> web.StreamResponse:
        """Text completion of a prompt, as one JSON object or as server-sent events."""
        return await self._generate(request, "completion", self._completion_object,
                                    self._completion_frames)

    async def _generate(self, request: web.Request, operation: str,
                        whole: Callable[[StreamReply, str, Final, str], dict[str, Any]],
                        frames: Callable[[StreamReply, str, bool], Frames]
                        ) -> web.StreamResponse:
        body = require_object(await read_json(request))
        reply: StreamReply = await self._run(request, operation, body)
        ident = new_id("chatcmpl-" if operation == "chat" else "cmpl-")
        if body.get("stream") is True:  # the gateway has checked it is a boolean
            options = body.get("stream_options") or {}
            return await stream_reply(
                request, reply, frames(reply, ident, options.get("include_usage") is True),
                content_type=SSE, keepalive=KEEPALIVE,
                interval=float(self.server.config["stream_keepalive"]))
        try:
            text, final = await reply.collect()
        finally:
            await reply.aclose()  # a client gone mid-generation stops it here
        return json_response(whole(reply, ident, final, text))

    def _head(self, reply: StreamReply, ident: str, kind: str) -> dict[str, Any]:
        return {"id": ident, "object": kind, "created": reply.created, "model": reply.model,
                "system_fingerprint": self.fingerprint}

    def _chat_object(self, reply: StreamReply, ident: str, final: Final, text: str
                     ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if final.tool_calls:
            message["content"] = text or None
            message["tool_calls"] = [tool_call(call) for call in final.tool_calls]
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": final.finish_reason}
        return {**self._head(reply, ident, "chat.completion"), "choices": [choice],
                **usage_fields(final)}

    def _completion_object(self, reply: StreamReply, ident: str, final: Final, text: str
                           ) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None,
                  "finish_reason": final.finish_reason}
        return {**self._head(reply, ident, "text_completion"), "choices": [choice],
                **usage_fields(final)}

    def _chat_frames(self, reply: StreamReply, ident: str, include_usage: bool) -> Frames:
        head = self._head(reply, ident, "chat.completion.chunk")

        def chunk(delta: Mapping[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
            return event({**head, "choices": [choice],
                          **({"usage": None} if include_usage else {})})

        async def frames(events: AsyncIterator[Delta | Final]) -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            async for item in events:
                if isinstance(item, Delta):
                    if item.text:
                        yield chunk({"content": item.text})
                    continue
                if item.tool_calls:
                    yield chunk({"tool_calls": [{"index": index, **tool_call(call)} for
                                                index, call in enumerate(item.tool_calls)]})
                yield chunk({}, item.finish_reason)
                if include_usage:
                    yield event({**head, "choices": [], **usage_fields(item)})
            yield DONE

        return frames

    def _completion_frames(self, reply: StreamReply, ident: str, include_usage: bool
                           ) -> Frames:
        head = self._head(reply, ident, "text_completion")

        def chunk(text: str, finish_reason: str | None = None) -> bytes:
            choice = {"text": text, "index": 0, "logprobs": None,
                      "finish_reason": finish_reason}
            return event({**head, "choices": [choice],
                          **({"usage": None} if include_usage else {})})

        async def frames(events: AsyncIterator[Delta | Final]) -> AsyncIterator[bytes]:
            async for item in events:
                if isinstance(item, Delta):
                    if item.text:
                        yield chunk(item.text)
                    continue
                yield chunk("", item.finish_reason)
                if include_usage:
                    yield event({**head, "choices": [], **usage_fields(item)})
            yield DONE

        return frames

    # ------------------------------------------------------------------ embeddings

    @runs("embeddings")
    async def embeddings(self, request: web.Request) -> web.Response:
        """Embeddings of one text or a list, as floats or base64 (little-endian float32)."""
        body = require_object(await read_json(request))
        reply = await self._run(request, "embeddings", body)
        value = reply.value
        timings = {"queue_seconds": value["queue_seconds"]} if "queue_seconds" in value else {}
        return json_response({"object": "list", "data": value["data"], "model": reply.model,
                              "usage": value["usage"], "timings": timings})

    # ------------------------------------------------------------------ pieces

    async def _run(self, request: web.Request, operation: str, body: Mapping[str, Any]) -> Any:
        return await self.server.gateway.run(self.server.call(request, operation, body))


def model_object(row: Mapping[str, Any]) -> dict[str, Any]:
    """A model as OpenAI lists one, with what Inferno knows beside it."""
    unavailable = row.get("unavailable") or None
    return {"id": row["name"], "object": "model", "created": _created(row.get("path")),
            "owned_by": "inferno", "aliases": list(row.get("aliases") or ()),
            "description": row.get("description"), "loaded": bool(row.get("loaded")),
            "available": unavailable is None, "unavailable": unavailable}


def _created(path: str | None) -> int:
    """The model file's modification time: the closest thing to when the model was made."""
    if not path:
        return 0
    try:
        return int(Path(path).stat().st_mtime)
    except OSError:
        return 0


def tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def usage_fields(final: Final) -> dict[str, Any]:
    """``usage`` with OpenAI's three counts, and Inferno's timings under their own key."""
    usage: dict[str, Any] = {key: int(final.usage.get(key) or 0) for key in USAGE_KEYS}
    if "cached_tokens" in final.usage:  # prompt tokens whose KV was reused, as OpenAI says it
        usage["prompt_tokens_details"] = {"cached_tokens": int(final.usage["cached_tokens"])}
    timings = {key: value for key, value in final.usage.items()
               if key not in USAGE_KEYS and key != "cached_tokens"}
    return {"usage": usage, "timings": timings}


def event(value: Any) -> bytes:
    """One server-sent event carrying ``value`` as JSON."""
    return b"data: " + json.dumps(value, ensure_ascii=False,
                                  separators=(",", ":")).encode() + b"\n\n"

