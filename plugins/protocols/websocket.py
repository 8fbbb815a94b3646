"""The ``websocket`` protocol: many model requests on one connection, multiplexed by id,
and the kernel events a client subscribes to.

The endpoint is ``/v1/ws``: on the ``http`` protocol's port when that protocol runs in
the same kernel (``share_http``), otherwise on an aiohttp server of its own. Every
request becomes a gateway call, so the middlewares other plugins contribute see it as
they see HTTP. docs/protocols/websocket.md describes the messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pluggy
from aiohttp import web
from dynaconf import Validator

from inferno.kernel import (
    ConfigError,
    ConfigProblem,
    ConfigSpec,
    KernelHandle,
    Protocol,
    hookimpl,
)
from inferno.kernel.resources import parse_amount
from inferno.plugins.gateway.calls import Call
from inferno.plugins.gateway.errors import ApiError
from inferno.plugins.gateway.permissions import AUTHENTICATED, requires

from . import http_hookspecs
from .web import credentials, error_response, forbidden_origin, origin_allowed
from .websocket_connection import Connection

PATH = "/v1/ws"
DEFAULTS: dict[str, Any] = {
    # Serve /v1/ws on the http protocol's port when it runs in this kernel; false: always
    # on a server of this protocol's own (host and port below).
    "share_http": True,
    # Address and port of the own server; port 0 picks a free port (see the log line).
    "host": "127.0.0.1",
    "port": 8081,
    # Largest frame a client may send; a larger one closes the connection with code 1009.
    "max_message_size": "1MiB",
    # Requests one connection may have in flight; one more gets an error frame.
    "max_inflight": 16,
    # Seconds between WebSocket pings; a client that does not answer is dropped; 0 for none.
    "heartbeat": 30.0,
    # Connections served at once; one more is refused with 503 before the upgrade.
    "max_connections": 256,
    # Web origins whose pages may connect to the own server, e.g. ["https://app.example.com"];
    # ["*"] any. Clients that send no Origin (not browsers) and pages of the server's own
    # origin always may. On the http protocol's port, its cors_origins apply instead.
    "allowed_origins": [],
}
#: Seconds a client may take to answer the server's close frame.
CLOSE_TIMEOUT = 3.0


class WebSocketProtocol(Protocol):
    """WebSocket: JSON text frames, concurrent requests by id, event subscriptions."""

    @staticmethod
    @hookimpl
    def inferno_add_hookspecs(plugin_manager: pluggy.PluginManager) -> None:
        http_hookspecs.add_to(plugin_manager)

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, validators=[
            Validator("share_http", is_type_of=bool),
            Validator("port", gte=0, lte=65535, is_type_of=int),
            Validator("max_inflight", gte=1, is_type_of=int),
            Validator("heartbeat", is_type_of=(int, float), gte=0),
            Validator("max_connections", gte=1, is_type_of=int),
            Validator("allowed_origins", is_type_of=list),
        ])

    @staticmethod
    @hookimpl
    def inferno_configure(config: Mapping[str, Any]) -> None:
        try:
            if parse_amount(config["max_message_size"]) <= 0:
                raise ValueError("not positive")
        except (ValueError, TypeError):
            raise ConfigError([ConfigProblem(
                "protocols.websocket.max_message_size",
                f"must be a positive amount like '1MiB', got {config['max_message_size']!r}")]
            ) from None

    @staticmethod
    @hookimpl
    def inferno_http_routes(kernel: KernelHandle) -> list[web.RouteDef] | None:
        if not shares_http(kernel.config):
            return None
        return [web.get(PATH, _shared_handler(kernel))]

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.connections: set[Connection] = set()
        self.accepting = False
        self.shared = False
        self.gateway: Any = None
        self.runner: web.AppRunner | None = None
        #: Where the own server listens, once started: ``http://host:port``.
        self.urls: list[str] = []
        self.max_message_size = parse_amount(self.config["max_message_size"])
        self.max_inflight = int(self.config["max_inflight"])
        #: Web origins whose pages may connect (see ``_origins``).
        self.origins: list[str] = []

    async def start(self) -> None:
        self.gateway = self.context.kernel.service("gateway")
        self.shared = shares_http(self.context.kernel.config)
        self.origins = self._origins()
        if not self.shared:
            await self._listen()
        self.accepting = True
        self.log.info("serving", path=PATH,
                      on="the http protocol's port" if self.shared else self.urls)

    async def _listen(self) -> None:
        app = web.Application()
        app.add_routes([web.get(PATH, self.handle)])
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.config["host"], int(self.config["port"]))
        await site.start()
        self.urls = [f"http://{_host(address[0])}:{address[1]}"
                     for address in self.runner.addresses]

    async def stop(self) -> None:
        """In-flight replies get the drain time to finish; then every connection is closed
        with 1001 (going away)."""
        self.accepting = False
        connections = list(self.connections)
        grace = _grace(self.context.kernel.config)
        await asyncio.gather(*(c.shutdown(grace) for c in connections), return_exceptions=True)
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the server that serves ``/v1/ws``."""
        if self.shared:
            return str(self.context.kernel.drivers("protocols")["http"].url)  # type: ignore[attr-defined]
        return self.urls[0]

    @property
    def endpoint(self) -> str:
        """The address a client connects to: ``ws://host:port/v1/ws``."""
        return "ws" + self.url.removeprefix("http") + PATH

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Upgrade, serve frames until the client or the server closes, then clean up."""
        refusal = self._refusal(request)
        if refusal is not None:
            return error_response(refusal, request.get("request_id", ""))
        if not self.shared:  # on the http port, its guard checked the route's permission
            try:
                await self.gateway.run(Call("access", protocol="websocket",
                                            credentials=credentials(request),
                                            permission=AUTHENTICATED))
            except ApiError as exc:
                return error_response(exc, request.get("request_id", ""))
        heartbeat = float(self.config["heartbeat"]) or None
        ws = web.WebSocketResponse(heartbeat=heartbeat, max_msg_size=self.max_message_size,
                                   timeout=CLOSE_TIMEOUT)
        connection = Connection(self, ws, credentials(request))
        self.connections.add(connection)  # before the handshake, which lets others in
        try:
            await ws.prepare(request)
            await connection.serve()
        finally:
            self.connections.discard(connection)
            await connection.abandon()
        return ws

    def _origins(self) -> list[str]:
        """The web origins allowed to connect: a page of any other site that opens a socket
        to a local Inferno (no preflight guards an upgrade) must not read its answers and
        events. On the http protocol's port, the origins it allows; else ``allowed_origins``."""
        if self.shared:
            http = self.context.kernel.config["protocols"]["http"]
            return list(http.get("cors_origins", ()))
        return list(self.config["allowed_origins"])

    def _refusal(self, request: web.Request) -> ApiError | None:
        if not origin_allowed(request, self.origins):
            return forbidden_origin(request, "protocols.http.cors_origins" if self.shared
                                    else "protocols.websocket.allowed_origins")
        if not self.accepting:
            return ApiError(503, "Inferno is stopping and accepts no new WebSocket connections",
                            code="draining", retry_after=5)
        limit = int(self.config["max_connections"])
        if len(self.connections) >= limit:
            return ApiError(503, f"the server has {limit} WebSocket connections open, the most "
                                 f"it takes (protocols.websocket.max_connections); try again "
                                 f"later", code="too_many_connections", retry_after=1)
        if not web.WebSocketResponse().can_prepare(request).ok:
            return ApiError(426, f"{PATH} is a WebSocket endpoint: connect with a WebSocket "
                                 f"client (Upgrade: websocket)", code="websocket_required")
        return None


def _shared_handler(kernel: KernelHandle) -> Any:
    """The route on the http protocol's server. The driver is looked up per request: it
    starts after, and stops before, the server that routes to it."""

    async def websocket(request: web.Request) -> web.StreamResponse:
        """The WebSocket protocol (an upgrade; see docs/protocols/websocket.md)."""
        driver = kernel.drivers("protocols").get("websocket")
        if not isinstance(driver, WebSocketProtocol) or not driver.accepting:
            raise ApiError(503, "the WebSocket protocol is not serving (starting or stopping); "
                                "try again shortly", code="not_ready", retry_after=1)
        return await driver.handle(request)

    # A socket is no request: the http server's concurrency limit leaves it to max_connections.
    websocket.long_lived = True  # type: ignore[attr-defined]
    return requires(AUTHENTICATED)(websocket)


def shares_http(config: Mapping[str, Any]) -> bool:
    """Whether ``/v1/ws`` is served by the http protocol of the same kernel."""
    protocols = config.get("protocols", {})
    http = protocols.get("http")
    own = protocols.get("websocket", {})
    return bool(own.get("share_http", True)) and isinstance(http, Mapping) \
        and http.get("enabled", True) is not False


def _grace(config: Mapping[str, Any]) -> float:
    """The drain time, kept well inside the time the kernel gives a plugin to stop."""
    kernel = config.get("kernel", {})
    drain = float(kernel.get("drain_timeout", 10.0))
    stop = float(kernel.get("stop_timeout", 10.0))
    return max(0.0, min(drain, stop - CLOSE_TIMEOUT - 1.0))


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
