"""The ``prometheus`` exporter: Inferno's metrics in Prometheus' text format.

Enabled with ``[exporters.prometheus]``. ``GET /metrics`` is served on the ``http``
protocol's server (``port = 0``, the default), where its guard asks for ``metrics:read``,
or on a server of its own (``host``/``port``), which asks the gateway for the same
permission. The counters move in a gateway middleware every protocol's calls pass through
and in an HTTP middleware (``prom_middleware.py``); docs/metrics.md lists every metric.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from dynaconf import Validator
from prometheus_client.exposition import choose_encoder

from inferno.kernel import ConfigSpec, Exporter, KernelHandle, hookimpl
from inferno.kernel.events import Subscription
from inferno.plugins.protocols.http_hookspecs import AddsHttpAndGatewayHooks

from .prom_metrics import LATENCY_BUCKETS, Metrics, StateCollector, process_collector
from .prom_middleware import MetricsMiddleware, http_middleware, load_observer

if TYPE_CHECKING:
    from inferno.plugins.gateway.calls import Middleware

#: The name this driver is enabled under, and the service the registry is offered as.
NAME = "prometheus"
SERVICE = "metrics"
PERMISSION = "metrics:read"

DEFAULTS: dict[str, Any] = {
    # The path Prometheus scrapes.
    "path": "/metrics",
    # 0: serve the path on the http protocol's server. Any other port: on a server of this
    # exporter's own, at host:port (metrics:read is still asked for when auth is on).
    "port": 0,
    "host": "127.0.0.1",
    # Upper bounds, in seconds, of the latency histograms' buckets (request duration, time
    # to first token, generation, queue wait).
    "latency_buckets": list(LATENCY_BUCKETS),
}


def _increasing(buckets: Any) -> bool:
    return isinstance(buckets, list) and bool(buckets) and all(
        isinstance(b, int | float) and not isinstance(b, bool) and b > 0 for b in buckets
    ) and all(a < b for a, b in itertools.pairwise(buckets))


class PrometheusExporter(AddsHttpAndGatewayHooks, Exporter):
    """Serves the metrics registry; offered to other plugins as ``metrics``."""

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, validators=[
            Validator("path", is_type_of=str, condition=lambda p: p.startswith("/"),
                      messages={"condition": "path must start with /"}),
            Validator("port", is_type_of=int, gte=0, lte=65535),
            Validator("host", is_type_of=str),
            Validator("latency_buckets", condition=_increasing,
                      messages={"condition": "latency_buckets must be a list of increasing "
                                             "positive seconds"}),
        ])

    @staticmethod
    @hookimpl
    def inferno_request_middleware(kernel: KernelHandle) -> Middleware | None:
        exporter = running(kernel)
        return MetricsMiddleware(exporter.metrics, kernel) if exporter else None

    @staticmethod
    @hookimpl
    def inferno_http_middlewares(kernel: KernelHandle) -> list[Any] | None:
        exporter = running(kernel)
        return [http_middleware(exporter.metrics)] if exporter else None

    @staticmethod
    @hookimpl
    def inferno_http_routes(kernel: KernelHandle) -> list[web.RouteDef] | None:
        exporter = running(kernel)
        if exporter is None or exporter.own_port:
            return None
        return [web.get(exporter.path, exporter.scrape_route())]

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.path = str(self.config["path"])
        self.own_port = int(self.config["port"]) != 0
        self.metrics = Metrics(self.config["latency_buckets"])
        self.runner: web.AppRunner | None = None
        #: Where the own server listens, once started: ``http://host:port``.
        self.urls: list[str] = []
        self._subscriptions: list[Subscription] = []

    @property
    def registry(self) -> Any:
        """The ``CollectorRegistry`` this exporter serves (other plugins may add to it)."""
        return self.metrics.registry

    async def start(self) -> None:
        kernel = self.context.kernel
        from inferno.plugins.models.events import ModelFailed, ModelLoaded

        self.registry.register(StateCollector(kernel))
        process_collector(self.registry)
        loaded, failed = load_observer(self.metrics, kernel)
        self._subscriptions = [kernel.bus.subscribe(ModelLoaded, loaded),
                               kernel.bus.subscribe(ModelFailed, failed)]
        kernel.provide(SERVICE, self)
        if self.own_port:
            await self._listen()
        elif not _http_enabled(kernel.config):
            self.log.warning("metrics are counted but not served: port 0 serves them on the "
                             "http protocol's server, which is not enabled; set "
                             "exporters.prometheus.port to serve them on a port of their own")
        self.log.info("serving metrics", path=self.path,
                      on=self.urls or "the http protocol's server")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        for subscription in self._subscriptions:
            subscription.cancel()

    async def refresh(self) -> None:
        """Have the cache tiers read their figures off the event loop before a scrape (the
        disk tier's SQLite counters, the Redis tier's SCAN)."""
        try:
            cache = self.context.kernel.service("cache")
        except LookupError:
            return
        await cache.fresh_stats()

    def exposition(self, accept: str = "") -> web.Response:
        """The registry in the format ``accept`` asks for (OpenMetrics or Prometheus text)."""
        encoder, content_type = choose_encoder(accept)
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

    def scrape_route(self) -> Any:
        """The handler of ``GET path`` on the http protocol's server, whose guard checks the
        caller for ``metrics:read`` before it runs."""
        from inferno.plugins.gateway.permissions import requires

        @requires(PERMISSION)
        async def metrics(request: web.Request) -> web.Response:
            """Prometheus metrics (text exposition format)."""
            await self.refresh()
            return self.exposition(request.headers.get("Accept", ""))

        return metrics

    async def _listen(self) -> None:
        app = web.Application(middlewares=[http_middleware(self.metrics)])
        app.add_routes([web.get(self.path, self._serve_own)])
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, str(self.config["host"]), int(self.config["port"]))
        await site.start()
        self.urls = [f"http://{_host(address[0])}:{address[1]}"
                     for address in self.runner.addresses]

    async def _serve_own(self, request: web.Request) -> web.Response:
        """``path`` on the own server: the caller is checked through the gateway (network
        policy, credentials, ``metrics:read``) and against DNS rebinding and other sites'
        pages, as on the http protocol's server."""
        from inferno.plugins.gateway.calls import Call
        from inferno.plugins.gateway.errors import ApiError
        from inferno.plugins.protocols.web import (
            credentials,
            error_response,
            host_allowed,
            origin_allowed,
        )

        # a web page on a DNS name rebound to loopback, or on another site
        if not (host_allowed(request, str(self.config["host"]), ()) and
                origin_allowed(request, ())):
            return error_response(ApiError(
                403, "this metrics server answers only requests addressed to an address or "
                     "localhost, and none from web pages of other sites",
                code="origin_not_allowed"))
        try:
            gateway = self.context.kernel.service("gateway")
        except LookupError:
            return error_response(ApiError(503, "Inferno is starting: callers cannot be "
                                                "checked yet", code="starting", retry_after=1))
        try:
            await gateway.run(Call("access", protocol="http", credentials=credentials(request),
                                   permission=PERMISSION))
        except ApiError as exc:
            return error_response(exc)
        await self.refresh()
        return self.exposition(request.headers.get("Accept", ""))

    @property
    def url(self) -> str:
        """``http://host:port`` of the own server (``port`` not 0)."""
        return self.urls[0]


def running(kernel: KernelHandle) -> PrometheusExporter | None:
    """This kernel's prometheus exporter, once started."""
    exporter = kernel.drivers("exporters").get(NAME)
    return exporter if isinstance(exporter, PrometheusExporter) else None


def _http_enabled(config: Mapping[str, Any]) -> bool:
    http = config.get("protocols", {}).get("http")
    return isinstance(http, Mapping) and http.get("enabled", True) is not False


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

