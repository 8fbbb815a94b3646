"""The ``http`` protocol: an aiohttp server for the OpenAI-compatible API, Inferno's own
API under ``/api/v1``, the Ollama-compatible routes and ``/openapi.json``.

Routes come from the modules beside this one and from other plugins through the
``inferno_http_routes`` hook; every model request goes through the gateway, so the
middlewares other plugins contribute (auth, rate limits, caching, metrics) see it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pluggy
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from dynaconf import Validator

from inferno.kernel import ConfigError, ConfigProblem, ConfigSpec, Protocol, hookimpl
from inferno.kernel.logs import get_logger
from inferno.kernel.resources import parse_amount

from . import http_hookspecs
from .web import (
    CALLS,
    MAX_BODY_SIZE,
    READ_TIMEOUT,
    SERVER,
    Server,
    envelope_middleware,
    guard_middleware,
    limit_middleware,
    origin_middleware,
)

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

DEFAULTS: dict[str, Any] = {
    # Address and port to listen on; port 0 picks a free port (see the log line "listening").
    "host": "127.0.0.1",
    "port": 8080,
    # A unix socket path to listen on as well ("" for none).
    "unix_socket": "",
    # TLS: PEM certificate chain and private key; both or neither.
    "tls_cert": "",
    "tls_key": "",
    # The oldest TLS version a client may use: "1.2" or "1.3".
    "tls_min_version": "1.2",
    # Origins browsers may call from (CORS), for example ["https://app.example.com"]; "*" any.
    "cors_origins": [],
    # On a loopback address, the host names (beside addresses and localhost) requests may
    # name in their Host header: a guard against DNS rebinding.
    "allowed_hosts": [],
    # Largest request body accepted; larger is refused with 413.
    "max_body_size": "4MiB",
    # Seconds a client may take to send its request body.
    "read_timeout": 60.0,
    # Seconds an idle keep-alive connection stays open.
    "keepalive_timeout": 75.0,
    # Requests served at once over HTTP; one more is refused with 503 and Retry-After.
    "max_concurrent": 256,
    # Seconds between keep-alive lines of a stream that waits in a model's queue.
    "stream_keepalive": 5.0,
    # One log line per request (method, path, status, duration, request id).
    "access_log": True,
}


class HttpProtocol(Protocol):
    """HTTP: OpenAI-compatible, Ollama-compatible and Inferno's own API."""

    @staticmethod
    @hookimpl
    def inferno_add_hookspecs(plugin_manager: pluggy.PluginManager) -> None:
        http_hookspecs.add_to(plugin_manager)

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, validators=[
            Validator("port", gte=0, lte=65535, is_type_of=int),
            Validator("read_timeout", gt=0),
            Validator("keepalive_timeout", gt=0),
            Validator("max_concurrent", gte=1, is_type_of=int),
            Validator("stream_keepalive", gt=0),
            Validator("cors_origins", "allowed_hosts", is_type_of=list),
            Validator("tls_min_version", is_in=list(TLS_VERSIONS)),
        ])

    @staticmethod
    @hookimpl
    def inferno_configure(config: Mapping[str, Any]) -> None:
        problems = []
        if bool(config["tls_cert"]) != bool(config["tls_key"]):
            problems.append(ConfigProblem("protocols.http.tls_cert",
                                          "tls_cert and tls_key must be given together"))
        for key in ("tls_cert", "tls_key"):
            if config[key] and not Path(config[key]).expanduser().is_file():
                problems.append(ConfigProblem(f"protocols.http.{key}",
                                              f"{config[key]} does not exist"))
        try:
            if parse_amount(config["max_body_size"]) <= 0:
                raise ValueError("not positive")
        except (ValueError, TypeError):
            problems.append(ConfigProblem("protocols.http.max_body_size",
                                          f"must be an amount like '4MiB', got "
                                          f"{config['max_body_size']!r}"))
        if problems:
            raise ConfigError(problems)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        #: Where the server listens, once started: ``http://host:port`` (and the socket).
        self.urls: list[str] = []
        socket = str(self.config["unix_socket"])
        self.socket_path = Path(socket).expanduser() if socket else None

    async def start(self) -> None:
        server = Server(gateway=self.context.kernel.service("gateway"), config=self.config,
                        log=self.log, kernel=self.context.kernel)
        self.app = build_app(server, self.context.kernel)
        self.runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log_class=AccessLogger,
            access_log=logging.getLogger("inferno.http.access") if self.config["access_log"]
            else None, keepalive_timeout=float(self.config["keepalive_timeout"]),
            max_field_size=MAX_FIELD_SIZE)
        _quiet_parser_errors()
        await self.runner.setup()
        context = self._tls()
        scheme = "https" if context else "http"
        site = web.TCPSite(self.runner, self.config["host"], int(self.config["port"]),
                           ssl_context=context, backlog=1024)
        await site.start()
        for sock in getattr(site._server, "sockets", None) or ():
            host, port = sock.getsockname()[:2]
            self.urls.append(f"{scheme}://{_host(host)}:{port}")
        if self.socket_path is not None:
            _remove(self.socket_path)
            await web.UnixSite(self.runner, str(self.socket_path), ssl_context=context).start()
            self.urls.append(f"unix:{self.socket_path}")
        self.log.info("listening", urls=self.urls)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.socket_path is not None:
            _remove(self.socket_path)

    @property
    def url(self) -> str:
        """The first TCP address, for clients and tests."""
        return next(url for url in self.urls if not url.startswith("unix:"))

    def _tls(self) -> ssl.SSLContext | None:
        if not self.config["tls_cert"]:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = TLS_VERSIONS[self.config["tls_min_version"]]
        context.load_cert_chain(Path(self.config["tls_cert"]).expanduser(),
                                Path(self.config["tls_key"]).expanduser())
        return context


def build_app(server: Server, kernel: Any) -> web.Application:
    from . import inferno_api, ollama_api, openai_api, openapi

    max_body = parse_amount(server.config["max_body_size"])
    extra = [m for found in kernel.hook.inferno_http_middlewares(kernel=kernel)
             for m in (found or ())]
    app = web.Application(client_max_size=max_body,
                          middlewares=[envelope_middleware(server), *extra,
                                       origin_middleware(server), guard_middleware(server),
                                       limit_middleware(server)])
    app[MAX_BODY_SIZE] = max_body
    app[READ_TIMEOUT] = float(server.config["read_timeout"])
    app[SERVER] = server
    routes = [*openai_api.routes(server), *inferno_api.routes(server),
              *ollama_api.routes(server)]
    for contributed in kernel.hook.inferno_http_routes(kernel=kernel):
        routes.extend(contributed or ())
    routes.extend(openapi.routes(server, routes))
    app.add_routes(routes)
    origins = list(server.config["cors_origins"])
    if origins:
        _cors(app, origins)
    return app


def _cors(app: web.Application, origins: list[str]) -> None:
    import aiohttp_cors

    # credentials (cookies, Authorization) only for origins named one by one: with "*" any
    # site could make calls that carry its visitors' credentials
    options = aiohttp_cors.ResourceOptions(allow_credentials="*" not in origins,
                                           expose_headers="*", allow_headers="*",
                                           allow_methods="*", max_age=600)
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)


def _remove(path: Path) -> None:
    """A socket file left by an earlier run (a killed process) would block the bind."""
    if path.is_socket():
        path.unlink()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


#: The longest header value read: room for a large JWT (aiohttp's default is 8190 bytes).
MAX_FIELD_SIZE = 16_384


class _NoRequestText(logging.Filter):
    """aiohttp logs a request it cannot parse with a traceback that quotes the offending
    header line, which may carry a key or a token. Keep the line saying what went wrong,
    without the traceback or the quoted text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            said = record.getMessage()
            record.msg, record.args = "%s: %s", (said, type(record.exc_info[1]).__name__)
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_parser_errors() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _NoRequestText) for f in server_log.filters):
        server_log.addFilter(_NoRequestText())


def _tokens(call: Any) -> int:
    """Prompt plus completion tokens of a call, when its reply reported them."""
    reply = call.state.get("reply")
    usage = reply.final.usage if reply is not None and reply.final is not None \
        else call.state.get("usage")
    if not isinstance(usage, Mapping):
        return 0
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    return sum(v for k in ("prompt_tokens", "completion_tokens")
               if isinstance(v := usage.get(k), int))


class AccessLogger(AbstractAccessLogger):
    """One structured line per request, with its id and duration."""

    _log = get_logger("http")

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # aiohttp calls this after the request's log context ended: the id is passed again
        fields: dict[str, Any] = {}
        models, tokens = set(), 0
        for call in request.get(CALLS, ()):
            if call.model:
                models.add(call.model)
            if "trace_id" in call.state:
                fields.setdefault("trace_id", call.state["trace_id"])
            tokens += _tokens(call)
        if models:
            fields["model"] = ",".join(sorted(models))
        if tokens:
            fields["tokens"] = tokens
        self._log.info("access", method=request.method, path=request.path,
                       status=response.status, ms=round(time * 1000, 2), peer=request.remote,
                       request_id=response.headers.get("X-Request-ID"), **fields)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
