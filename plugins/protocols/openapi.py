"""``GET /openapi.json``: an OpenAPI 3.1 document of the routes this server serves.

The document is built from the application's own route list, so it describes what runs:
a route that Inferno describes here gets its bodies, responses and errors; a route a
plugin contributed without a description is still listed (from its handler's docstring)
and marked ``x-inferno-undescribed``, so that nothing the server answers is missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from typing import Any

from aiohttp import web

from inferno.plugins.gateway.permissions import public

from .openapi_schemas import SCHEMAS, ref
from .web import Server

#: Methods an OpenAPI path item can hold; HEAD (added beside every GET) and OPTIONS (CORS
#: preflight) are the server's own and are not listed.
METHODS = ("get", "put", "post", "delete", "patch")
_PARAMETER = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def routes(server: Server, app_routes: Sequence[web.AbstractRouteDef]) -> list[web.RouteDef]:
    """``GET /openapi.json`` for ``app_routes`` (every other route of the application, the
    ones plugins contributed included), built once: the routes do not change while the
    server runs."""
    endpoints = [*route_paths(app_routes), ("GET", "/openapi.json", None)]
    body = json.dumps(document(endpoints), ensure_ascii=False, separators=(",", ":")).encode()

    @public
    async def openapi_json(request: web.Request) -> web.Response:
        """This document."""
        return web.Response(body=body, content_type="application/json")

    return [web.get("/openapi.json", openapi_json)]


def route_paths(app_routes: Sequence[web.AbstractRouteDef]
                ) -> Iterator[tuple[str, str, Any]]:
    """``(METHOD, /openapi/path, handler)`` of every route, with ``{name:regex}``
    parameters written as OpenAPI writes them (``{name}``)."""
    for route in app_routes:
        if isinstance(route, web.RouteDef):
            methods = ("GET", "POST") if route.method == "*" else (route.method,)
            for method in methods:
                yield method.upper(), canonical(route.path), route.handler
        elif isinstance(route, web.StaticDef):
            yield "GET", canonical(route.prefix.rstrip("/") + "/{filename}"), None


def canonical(path: str) -> str:
    return _PARAMETER.sub(lambda match: "{" + match.group(1) + "}", path)


def document(endpoints: Sequence[tuple[str, str, Any]]) -> dict[str, Any]:
    """The OpenAPI document for ``endpoints``: described ones as described, the others
    listed from their handlers."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, handler in endpoints:
        if method.lower() not in METHODS:
            continue
        described = DESCRIBED.get((method, path))
        operation = described if described is not None else undescribed(path, handler)
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Inferno", "version": version("inferno"),
                 "description": "Inferno's HTTP API: OpenAI-compatible routes under /v1, "
                                "Inferno's own under /api/v1, Ollama-compatible under "
                                "/api, health checks under /health. Errors are the OpenAI "
                                "envelope {error: {message, type, param, code}}; the "
                                "Ollama-compatible routes answer {error: message}, as "
                                "Ollama does.",
                 "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
        "tags": TAGS,
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": SCHEMAS,
            "responses": ERROR_RESPONSES,
            "headers": {"RetryAfter": {"description": "Seconds to wait before trying again",
                                       "schema": {"type": "integer", "minimum": 1}},
                        "RequestId": {"description": "The request's id (X-Request-ID as "
                                                     "sent, or generated)",
                                      "schema": {"type": "string"}}},
        },
    }


def undescribed(path: str, handler: Any) -> dict[str, Any]:
    """A route nobody described: listed with its handler's docstring, any response."""
    doc = (getattr(handler, "__doc__", None) or "").strip()
    summary = doc.splitlines()[0] if doc else f"A route served at {path}"
    return {
        "summary": summary, "tags": ["Plugins"], "x-inferno-undescribed": True,
        "parameters": [{"name": name, "in": "path", "required": True,
                        "schema": {"type": "string"}} for name in _PARAMETER.findall(path)],
        "responses": {"default": {"description": "Whatever the route answers; errors in "
                                                 "the envelope",
                                  "content": {"application/json": {"schema": {}}}}},
    }


# --------------------------------------------------------------------------- described routes

JSON = "application/json"
TAGS = [{"name": "OpenAI-compatible", "description": "The routes OpenAI's SDKs call"},
        {"name": "Inferno", "description": "Models and status"},
        {"name": "Ollama-compatible", "description": "The routes Ollama's clients call"},
        {"name": "Health", "description": "Probes for load balancers; no authentication"},
        {"name": "Documentation"}, {"name": "Plugins", "description": "Contributed routes"}]


#: Error responses by name: the status and when it comes.
ERRORS: dict[str, tuple[str, str]] = {
    "BadRequest": ("400", "The body is not JSON, or a field is wrong (param names it)"),
    "NotFound": ("404", "No such model (code model_not_found)"),
    "RequestTimeout": ("408", "The body did not arrive within read_timeout"),
    "Conflict": ("409", "The model has no previous version to roll back to"),
    "TooLarge": ("413", "The body is larger than max_body_size (code body_too_large)"),
    "NotImplemented": ("501", "Not supported by Inferno; the message says what to do instead"),
    "Unavailable": ("503", "Busy (queue_full, queue_timeout, server_busy), draining, or the "
                           "model is unavailable; Retry-After says when to try again"),
}
#: Ollama's routes answer errors as {"error": "message"}, except the server-wide refusals
#: that come before a route is chosen (server_busy), which are the envelope.
_OLLAMA_ERROR = {"anyOf": [ref("OllamaError"), ref("Error")]}


def _error(description: str, schema: dict[str, Any], *, retry: bool) -> dict[str, Any]:
    headers = {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}}
    if retry:
        headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfter"}
    return {"description": description, "content": {JSON: {"schema": schema}},
            "headers": headers}


ERROR_RESPONSES = {
    **{name: _error(text, ref("Error"), retry=status == "503")
       for name, (status, text) in ERRORS.items()},
    **{f"Ollama{name}": _error(text, _OLLAMA_ERROR, retry=status == "503")
       for name, (status, text) in ERRORS.items()},
}


def operation(summary: str, tag: str, ok: dict[str, Any] | None, *, body: str | None = None,
              errors: Sequence[str] = (), name: str | None = None,
              description: str = "") -> dict[str, Any]:
    """One described operation: ``ok`` the 200 content by media type, ``body`` the request
    schema's name, ``errors`` the error responses beyond the ones every call may get."""
    wanted = {*errors, "Unavailable"}  # server_busy and draining, on every gateway route
    if body is not None:
        wanted |= {"BadRequest", "RequestTimeout", "TooLarge"}
    prefix = "Ollama" if tag == _TAG_L else ""
    responses = {"200": {"description": "Success", "content": ok}} if ok is not None else {}
    result: dict[str, Any] = {
        "summary": summary, "tags": [tag],
        "responses": {**responses, **{
            ERRORS[e][0]: {"$ref": f"#/components/responses/{prefix}{e}"}
            for e in sorted(wanted, key=lambda e: ERRORS[e][0])}}}
    if description:
        result["description"] = description
    if name is not None:
        result["parameters"] = [{"name": name, "in": "path", "required": True,
                                 "description": "A model's name or alias",
                                 "schema": {"type": "string"}}]
    if body is not None:
        result["requestBody"] = {"required": True, "content": {JSON: _body(body)}}
    return result


def _body(schema: str) -> dict[str, Any]:
    examples = {name: {"value": value} for name, value in EXAMPLES.get(schema, {}).items()}
    return {"schema": ref(schema), **({"examples": examples} if examples else {})}


_GEMMA, _MINILM = "gemma-3-270m", "minilm"
_ASK = [{"role": "user", "content": "Name three rivers."}]
_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
#: Request bodies for each schema, by name: what a reader copies, and what fuzzing starts from.
EXAMPLES: dict[str, dict[str, Any]] = {
    "ChatCompletionRequest": {
        "chat": {"model": _GEMMA, "messages": _ASK, "max_tokens": 16},
        "stream": {"model": _GEMMA, "messages": _ASK, "max_tokens": 16, "stream": True,
                   "stream_options": {"include_usage": True}},
        "tool": {"model": _GEMMA, "messages": [{"role": "user", "content": "Weather in Oslo?"}],
                 "tools": [_WEATHER], "tool_choice": "required", "max_tokens": 64},
        "json": {"model": _GEMMA, "messages": _ASK, "max_tokens": 32,
                 "response_format": {"type": "json_object"}}},
    "CompletionRequest": {
        "completion": {"model": _GEMMA, "prompt": "The capital of France is",
                       "max_tokens": 8, "temperature": 0},
        "stream": {"model": _GEMMA, "prompt": "Once upon a time", "max_tokens": 8,
                   "stream": True}},
    "EmbeddingRequest": {"texts": {"model": _MINILM, "input": ["hello", "world"]}},
    "LoadRequest": {"keep": {"keep_alive": "10m"}},
    "OllamaShowRequest": {"show": {"model": _GEMMA}},
    "OllamaGenerateRequest": {
        "generate": {"model": _GEMMA, "prompt": "Why is the sky blue?", "stream": False,
                     "options": {"num_predict": 16}},
        "load": {"model": _GEMMA}},
    "OllamaChatRequest": {"chat": {"model": _GEMMA, "messages": _ASK,
                                   "options": {"num_predict": 16}}},
    "OllamaEmbedRequest": {"embed": {"model": _MINILM, "input": ["hello", "world"]}},
    "OllamaEmbeddingsRequest": {"embedding": {"model": _MINILM, "prompt": "hello"}},
}


def _json(schema: str) -> dict[str, Any]:
    return {JSON: {"schema": ref(schema)}}


def _stream(schema: str, media: str, frames: str) -> dict[str, Any]:
    """The whole answer as JSON, or a stream. A server-sent event stream's schema is that of
    one event (as OpenAPI 3.2's itemSchema says it, and as schemathesis reads it)."""
    item: dict[str, Any] = {"type": "string", "description": frames}
    if media == "text/event-stream":
        item = {"type": "object", "description": frames, "required": ["data"], "properties": {
            "data": {"type": "string", "description": "A chunk as JSON, or [DONE]"},
            "event": {"type": "string"}, "id": {"type": "string"}}}
    return {**_json(schema), media: {"schema": item}}


_SSE = ("With stream: true, server-sent events: a role delta, content deltas, a chunk with "
        "finish_reason, a usage chunk when stream_options.include_usage, then "
        "'data: [DONE]'. Lines ': keep-alive' while the request waits in the queue.")
_NDJSON = "With stream: true (the default), one JSON object per line; the last has done: true."
_TAG_O, _TAG_I, _TAG_L, _TAG_H = "OpenAI-compatible", "Inferno", "Ollama-compatible", "Health"

DESCRIBED: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/v1/models"): operation("List models", _TAG_O, _json("ModelList")),
    ("GET", "/v1/models/{id}"): operation("One model", _TAG_O, _json("Model"),
                                          errors=["NotFound"], name="id"),
    ("POST", "/v1/chat/completions"): operation(
        "Chat completion", _TAG_O, _stream("ChatCompletion", "text/event-stream", _SSE),
        body="ChatCompletionRequest", errors=["NotFound"],
        description="Tools come back as tool_calls with arguments as a JSON text, generated "
                    "under a grammar so that they parse."),
    ("POST", "/v1/completions"): operation(
        "Text completion", _TAG_O, _stream("Completion", "text/event-stream", _SSE),
        body="CompletionRequest", errors=["NotFound"]),
    ("POST", "/v1/embeddings"): operation("Embeddings", _TAG_O, _json("EmbeddingList"),
                                          body="EmbeddingRequest", errors=["NotFound"]),
    ("GET", "/api/v1/models"): operation("Every registered model and its status", _TAG_I,
                                         _json("InfernoModelList")),
    ("GET", "/api/v1/models/{name}"): operation(
        "A model's status and details", _TAG_I, _json("ModelDetails"), errors=["NotFound"],
        name="name"),
    ("POST", "/api/v1/models/{name}/load"): {
        **operation("Load a model now", _TAG_I, _json("LoadResult"), name="name",
                    errors=["NotFound", "BadRequest", "RequestTimeout", "TooLarge"]),
        "requestBody": {"required": False, "content": {JSON: _body("LoadRequest")}}},
    ("POST", "/api/v1/models/{name}/unload"): operation(
        "Unload a model (requests in flight finish first)", _TAG_I, _json("UnloadResult"),
        errors=["NotFound"], name="name"),
    ("POST", "/api/v1/models/{name}/rollback"): operation(
        "Serve a hot-swapped model's previous version again", _TAG_I,
        _json("RollbackResult"), errors=["NotFound", "Conflict"], name="name"),
    ("GET", "/api/v1/status"): operation(
        "Version, uptime, loaded models with their memory, queue depths", _TAG_I,
        _json("Status")),
    ("GET", "/api/version"): operation("Inferno's version", _TAG_L, _json("OllamaVersion")),
    ("GET", "/api/tags"): operation("The models that can be served", _TAG_L,
                                    _json("OllamaTags")),
    ("GET", "/api/ps"): operation("The loaded models", _TAG_L, _json("OllamaPs")),
    ("POST", "/api/show"): operation("A model's details, metadata and capabilities", _TAG_L,
                                     _json("OllamaShow"), body="OllamaShowRequest",
                                     errors=["NotFound"]),
    ("POST", "/api/generate"): operation(
        "Generate from a prompt", _TAG_L,
        _stream("OllamaGenerateResponse", "application/x-ndjson", _NDJSON),
        body="OllamaGenerateRequest", errors=["NotFound"]),
    ("POST", "/api/chat"): operation(
        "The assistant's next message", _TAG_L,
        _stream("OllamaChatResponse", "application/x-ndjson", _NDJSON),
        body="OllamaChatRequest", errors=["NotFound"]),
    ("POST", "/api/embed"): operation("Embeddings of one text or a list", _TAG_L,
                                      _json("OllamaEmbedResponse"),
                                      body="OllamaEmbedRequest", errors=["NotFound"]),
    ("POST", "/api/embeddings"): operation("The embedding of one prompt (older route)", _TAG_L,
                                           _json("OllamaEmbeddingsResponse"),
                                           body="OllamaEmbeddingsRequest",
                                           errors=["NotFound"]),
    **{(method, f"/api/{name}"): operation(
        f"Not supported: Ollama's model management ({name})", _TAG_L, None,
        errors=["NotImplemented"], description="Inferno serves the models its profile "
                                               "registers, or `inferno models add`.")
       for method, name in (("POST", "pull"), ("POST", "push"), ("POST", "create"),
                            ("POST", "copy"), ("DELETE", "delete"))},
    ("GET", "/health/live"): {"summary": "200 while the process serves", "tags": [_TAG_H],
                              "responses": {"200": {"description": "Live",
                                                    "content": _json("Live")}}},
    ("GET", "/health/ready"): {
        "summary": "200 when running and every preloaded model loaded", "tags": [_TAG_H],
        "responses": {"200": {"description": "Ready", "content": _json("Ready")},
                      "503": {"description": "Starting, draining or a preload failed; "
                                             "reasons says which", "content": _json("Ready")}}},
    ("GET", "/openapi.json"): {"summary": "This document", "tags": ["Documentation"],
                               "responses": {"200": {"description": "OpenAPI 3.1",
                                                     "content": {JSON: {"schema": {
                                                         "type": "object"}}}}}},
    ("GET", "/v1/ws"): {
        "summary": "The WebSocket protocol (an upgrade; see docs/protocols/websocket.md)",
        "tags": ["Plugins"],
        "responses": {"101": {"description": "Switching to WebSocket: JSON text frames"},
                      "426": {"description": "Not a WebSocket handshake: upgrade required",
                              "content": _json("Error")}}},
}
