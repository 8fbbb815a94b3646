"""What every HTTP route shares: request ids, the error envelope, JSON bodies, calls,
and streaming a reply with keep-alive lines while it waits for its turn."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from inferno.kernel import Credentials, Principal
from inferno.kernel.logs import request_context
from inferno.plugins.gateway.bodies import loads
from inferno.plugins.gateway.calls import Call, Delta, Final, StreamReply, new_id
from inferno.plugins.gateway.errors import ApiError, from_exception
from inferno.plugins.gateway.permissions import AUTHENTICATED, declared

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
JSON = "application/json"


@dataclass
class Server:
    """What route modules get: the gateway, the HTTP settings and a logger."""

    gateway: Any
    config: Mapping[str, Any]
    log: structlog.typing.FilteringBoundLogger
    kernel: Any
    #: Requests being served now (for the concurrency limit).
    active: int = 0

    def call(self, request: web.Request, operation: str, body: Mapping[str, Any],
             protocol: str = "http") -> Call:
        return request_call(request, operation, body, protocol)


#: What the application holds for its routes.
MAX_BODY_SIZE = web.AppKey("max_body_size", int)
READ_TIMEOUT = web.AppKey("read_timeout", float)
SERVER = web.AppKey("server", Server)
#: The gateway calls a request made (their ``meta`` becomes ``X-Inferno-*`` headers).
CALLS = web.RequestKey("calls", list)
#: Who the guard found the caller to be (``None`` on public routes).
PRINCIPAL = web.RequestKey("principal", Principal)
#: The request's id (``X-Request-ID``), set before any route runs.
REQUEST_ID = web.RequestKey("request_id", str)


def request_call(request: web.Request, operation: str, body: Mapping[str, Any],
                 protocol: str = "http") -> Call:
    """The gateway call a route makes for ``request``: its id, credentials and the principal
    the guard found; remembered on the request for its ``X-Inferno-*`` headers and the
    access log."""
    made = Call(operation=operation, body=body, protocol=protocol, id=request[REQUEST_ID],
                credentials=credentials(request), principal=request.get(PRINCIPAL))
    request.setdefault(CALLS, []).append(made)
    return made


async def run_operation(kernel: Any, request: web.Request, operation: str,
                        body: Mapping[str, Any]) -> Any:
    """The value of ``operation`` run through the gateway for ``request`` (for the routes
    plugins add with ``inferno_http_routes``)."""
    reply = await kernel.service("gateway").run(request_call(request, operation, body))
    return reply.value


def credentials(request: web.Request) -> Credentials:
    headers = {name.lower(): value for name, value in request.headers.items()}
    peer = request.remote or ""
    return Credentials(headers=headers, peer=peer)


def origin_allowed(request: web.BaseRequest, origins: Sequence[str]) -> bool:
    """Whether a request may be served given its ``Origin`` header: none (not a browser),
    the server's own origin, or one of ``origins`` (``"*"`` allows any).

    A web page may send simple requests (a ``text/plain`` POST, a WebSocket upgrade) to a
    server on loopback without any preflight; this check keeps pages of other sites from
    using a local Inferno (loading models, reading answers) behind their user's back."""
    origin = request.headers.get("Origin")
    if origin is None or "*" in origins or origin in origins:
        return True
    own = f"{request.scheme}://{request.host}"
    # a page of a name that resolves here (DNS rebinding) would be "own": only addresses
    # and localhost count as the server's own origin; names must be listed
    return origin.lower() == own.lower() and _literal_host(request.host)


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _literal_host(host: str) -> bool:
    """Whether a Host header names an IP address or localhost, not a DNS name."""
    name = _hostname(host).lower()
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(request: web.BaseRequest, listening: str, names: Sequence[str]) -> bool:
    """Whether a server listening on ``listening`` may answer this request's ``Host``: on a
    loopback address only an address, localhost or one of ``names`` (a web page on a DNS
    name an attacker points at 127.0.0.1 must not reach a local Inferno)."""
    try:
        loopback = listening == "localhost" or ipaddress.ip_address(listening).is_loopback
    except ValueError:
        loopback = False
    if not loopback or not _literal_host(request.remote or ""):
        return True  # on a network address, or a Unix socket (which no web page reaches)
    return _literal_host(request.host) or _hostname(request.host).lower() in \
        {name.lower() for name in names}


def forbidden_origin(request: web.BaseRequest, key: str = "protocols.http.cors_origins"
                     ) -> ApiError:
    """The refusal of a request ``origin_allowed`` turned down; ``key`` is the setting that
    lists the allowed origins."""
    return ApiError(403, f"requests from the web origin {request.headers.get('Origin')!r} are "
                         f"not allowed; add it to {key} to allow them",
                    code="origin_not_allowed")


def error_response(error: ApiError, request_id: str = "", path: str = "") -> web.Response:
    """The error in the envelope its route's clients read: ``{"error": "..."}`` on the
    Ollama-compatible routes (``/api/...`` but not ``/api/v1``), OpenAI's elsewhere."""
    headers = dict(error.headers)
    if request_id:
        headers["X-Request-ID"] = request_id
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    ollama = path.startswith("/api/") and not path.startswith("/api/v1/")
    body = {"error": error.message} if ollama else error.envelope()
    return web.json_response(body, status=error.status, headers=headers)


def envelope_middleware(server: Server) -> Any:
    """Request ids bound into every log line and echoed; every failure in the OpenAI error
    envelope; a 500 only for a bug, logged with its traceback."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request],
                                                                 Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        given = request.headers.get("X-Request-ID", "")
        request[REQUEST_ID] = given if _REQUEST_ID.match(given) else new_id()
        with request_context(request[REQUEST_ID], method=request.method,
                             path=request.path):
            try:
                response = await handler(request)
            except ApiError as exc:
                return error_response(exc, request[REQUEST_ID], request.path)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                return error_response(_http_error(exc, request), request[REQUEST_ID],
                                      request.path)
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception as exc:
                error = from_exception(exc)
                if error.status >= 500 and not isinstance(exc, ApiError):
                    server.log.exception("request failed", error=str(exc))
                return error_response(error, request[REQUEST_ID], request.path)
            if not response.prepared:
                response.headers["X-Request-ID"] = request[REQUEST_ID]
                response.headers.update(meta_headers(request))
            return response

    return middleware


def origin_middleware(server: Server) -> Any:
    """Refuse requests a web page of another site sent (see ``origin_allowed``)."""
    origins = list(server.config["cors_origins"])
    listening, names = str(server.config["host"]), list(server.config["allowed_hosts"])

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request],
                                                                 Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if not host_allowed(request, listening, names):
            raise ApiError(403, f"this server listens on loopback and answers only to "
                                f"addresses and localhost, not to the name "
                                f"{_hostname(request.host)!r}; add it to "
                                f"protocols.http.allowed_hosts to allow it",
                           code="host_not_allowed")
        if request.method != "OPTIONS" and not origin_allowed(request, origins):
            raise forbidden_origin(request)
        return await handler(request)

    return middleware


def guard_middleware(server: Server) -> Any:
    """Every route says what it needs (``inferno.plugins.gateway.permissions``), and the
    caller is checked through the gateway (an ``access`` call: network policy, credentials,
    permission) before the route reads a byte of the body: a stranger learns nothing from a
    route's validation. A route that runs gateway operations needs any principal here (each
    operation checks its own permission, with the principal found here); a route that says
    nothing is not served."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request],
                                                                 Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        info = request.match_info
        if info.http_exception is not None or request.method == "OPTIONS":
            return await handler(request)  # no route (404, 405) or a CORS preflight
        operations, permission = declared(info.handler)
        if operations:
            permission = AUTHENTICATED
        elif not permission:
            route = info.route.resource.canonical if info.route.resource else request.path
            raise ApiError(500, f"route {request.method} {route} declares no permission, so "
                                f"it is not served", code="undeclared_route")
        call = Call("access", protocol="http", id=request[REQUEST_ID],
                    credentials=credentials(request), permission=permission)
        await server.gateway.run(call)
        if call.principal is not None:
            request[PRINCIPAL] = call.principal
        return await handler(request)

    return middleware


def limit_middleware(server: Server) -> Any:
    """At most ``max_concurrent`` requests at once; one more gets 503 with Retry-After."""
    limit = int(server.config["max_concurrent"])

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request],
                                                                 Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if request.path.startswith("/health/") or \
                getattr(request.match_info.handler, "long_lived", False):
            return await handler(request)  # a socket is not a request: it has its own limits
        if server.active >= limit:
            raise ApiError(503, f"the server is serving {limit} requests, the most it takes at "
                                f"once (protocols.http.max_concurrent); try again later",
                           code="server_busy", retry_after=1)
        server.active += 1
        try:
            return await handler(request)
        finally:
            server.active -= 1

    return middleware


def _http_error(exc: web.HTTPException, request: web.Request) -> ApiError:
    if exc.status == 413:
        return ApiError(413, f"the request body is larger than this server accepts "
                             f"({request.app[MAX_BODY_SIZE]} bytes, "
                             f"protocols.http.max_body_size)", code="body_too_large")
    if exc.status == 404:
        return ApiError(404, f"no route {request.method} {request.path}; see /openapi.json",
                        code="unknown_route")
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return ApiError(405, f"{request.method} is not allowed on {request.path} (allowed: "
                             f"{allowed})", code="method_not_allowed")
    return ApiError(exc.status, exc.text or exc.reason, code=exc.reason.lower().replace(" ", "_"))


async def read_json(request: web.Request) -> Any:
    """The body as JSON, or a 400/413/408 that says what was wrong and where."""
    timeout = request.app[READ_TIMEOUT]
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s "
                            f"(protocols.http.read_timeout)", code="read_timeout") from None
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not UTF-8: byte {exc.start} is "
                            f"0x{raw[exc.start]:02x}", code="invalid_encoding") from None
    return loads(text, "the request body")


#: The status a request is counted with when its client went away before the answer (nginx's).
CLIENT_CLOSED = 499


def status_of(error: BaseException) -> int:
    """The HTTP status a request that raised ``error`` is answered (or counted) with."""
    if isinstance(error, web.HTTPException | ApiError):
        return error.status
    if isinstance(error, asyncio.CancelledError | ConnectionResetError):
        return CLIENT_CLOSED
    return from_exception(error).status if isinstance(error, Exception) else 500


def meta_headers(request: web.BaseRequest) -> dict[str, str]:
    """``X-Inferno-<Key>`` headers from what the request's calls were told (``Call.meta``)."""
    headers: dict[str, str] = {}
    for call in request.get(CALLS, ()):
        for key, value in call.meta.items():
            headers[f"X-Inferno-{key.replace('_', '-').title()}"] = str(value)
    return headers


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def stream_reply(request: web.Request, reply: StreamReply, frames: Callable[
        [AsyncIterator[Delta | Final]], AsyncIterator[bytes]], *, content_type: str,
        keepalive: bytes | None, interval: float) -> web.StreamResponse:
    """Stream ``reply`` framed by ``frames``.

    The reply is started first: an error found before the first token (a prompt too
    long for the context) still gets its status. While it waits in the model's queue
    longer than ``interval``, the stream opens and ``keepalive`` is written every
    ``interval`` seconds (SSE comment lines). A client that goes away closes the reply,
    which stops the generation within a decode step.
    """
    starting = asyncio.ensure_future(reply.start())
    response = web.StreamResponse(headers={
        "Content-Type": content_type, "Cache-Control": "no-cache",
        "X-Request-ID": request[REQUEST_ID], "X-Accel-Buffering": "no",
        **meta_headers(request)})
    try:
        done, _ = await asyncio.wait({starting}, timeout=interval)
        if not done:
            await response.prepare(request)
            while not done:
                if keepalive is not None:
                    await response.write(keepalive)
                done, _ = await asyncio.wait({starting}, timeout=interval)
        starting.result()  # an error before the first token is raised here
        if not response.prepared:
            await response.prepare(request)
        async for frame in frames(aiter(reply)):
            await response.write(frame)
        await response.write_eof()
        return response
    except ApiError as exc:
        if not response.prepared:
            raise
        await _write_error(response, exc, content_type)
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        error = from_exception(exc)
        if not response.prepared:
            raise
        if error.status >= 500:
            structlog.get_logger("inferno", plugin="http").exception("stream failed")
        await _write_error(response, error, content_type)
        return response
    finally:
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
        await reply.aclose()


async def _write_error(response: web.StreamResponse, error: ApiError, content_type: str
                       ) -> None:
    """An error after the stream opened: one more frame, then the end of the stream."""
    body = _dumps(error.envelope())
    frame = f"data: {body}\n\n" if content_type.startswith("text/event-stream") \
        else f"{body}\n"
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await response.write(frame.encode())
        await response.write_eof()


def since(started: float) -> float:
    return time.perf_counter() - started


def paths_of(routes: Iterable[web.AbstractRouteDef]) -> list[tuple[str, str]]:
    """``(method, path)`` of route definitions (for the OpenAPI check)."""
    return [(route.method, route.path) for route in routes
            if isinstance(route, web.RouteDef)]
