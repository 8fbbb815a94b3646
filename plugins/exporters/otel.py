"""The ``otel`` exporter: OpenTelemetry traces of every request.

Enabled with ``[exporters.otel]``. Each HTTP request gets a server span (continuing a W3C
``traceparent``), each gateway call a span under it (or a root span of its own for
WebSocket messages and stdin lines), and each call's steps (authentication, rate limits,
the cache lookup, the queue, the model load, prompt evaluation and generation) children
timed from the marks the gateway leaves on the call. Spans go to an OTLP collector over
HTTP or gRPC, or to the console; the trace id is bound into every log line of the request.

The driver owns its own ``TracerProvider``: never the process-wide one, so that several
kernels in one process (tests, embedders) keep their traces apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dynaconf import Validator

from inferno.kernel import ConfigError, ConfigProblem, ConfigSpec, Exporter, KernelHandle, hookimpl
from inferno.plugins.protocols.http_hookspecs import AddsHttpAndGatewayHooks

from .otel_setup import EXPORTERS, build_provider, parse_headers

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from inferno.plugins.gateway.calls import Middleware

DEFAULTS: dict[str, Any] = {
    # Where spans go: "otlp_http", "otlp_grpc", "console" (stderr) or "none" (spans are made,
    # trace ids reach the logs, nothing is sent).
    "exporter": "otlp_http",
    # The collector. "" is OpenTelemetry's default: http://localhost:4318/v1/traces for
    # otlp_http (the whole URL), http://localhost:4317 for otlp_grpc (https:// for TLS).
    "endpoint": "",
    # Headers sent with each export, "name=value,name2=value2" (OTEL_EXPORTER_OTLP_HEADERS's
    # format; values percent-encoded), for a collector that wants an API key. Secret.
    "headers": "",
    # The service.name resource attribute the collector files the spans under.
    "service_name": "inferno",
    # Share of new traces recorded, 0 to 1. A request continuing a caller's trace follows
    # the caller's decision (parent-based).
    "sampling_ratio": 1.0,
    # Seconds one export may take before it is given up.
    "timeout": 10.0,
}


class OtelExporter(AddsHttpAndGatewayHooks, Exporter):
    """OpenTelemetry traces: a span tree per request, exported over OTLP or to the console."""

    provider: TracerProvider | None = None
    _tracer: Tracer | None = None

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, secrets=frozenset({"headers"}), validators=[
            Validator("exporter", is_in=list(EXPORTERS)),
            Validator("endpoint", "headers", "service_name", is_type_of=str),
            Validator("sampling_ratio", is_type_of=(int, float), gte=0, lte=1),
            Validator("timeout", is_type_of=(int, float), gt=0),
        ])

    @staticmethod
    @hookimpl
    def inferno_configure(config: Mapping[str, Any]) -> None:
        try:
            parse_headers(str(config["headers"]))
        except ValueError as exc:  # the message never quotes the value: it may be a key
            raise ConfigError([ConfigProblem("exporters.otel.headers", str(exc))]) from None

    @staticmethod
    @hookimpl
    def inferno_request_middleware(kernel: KernelHandle) -> Sequence[Middleware]:
        from .otel_calls import OperationMarker, TracingMiddleware

        return [TracingMiddleware(_driver(kernel)), OperationMarker()]

    @staticmethod
    @hookimpl
    def inferno_http_middlewares(kernel: KernelHandle) -> Sequence[Any]:
        from .otel_http import http_middleware

        return [http_middleware(_driver(kernel))]

    async def start(self) -> None:
        self.provider = build_provider(self.config)
        self._tracer = self.provider.get_tracer("inferno")
        self.log.info("tracing", exporter=self.config["exporter"],
                      endpoint=self.config["endpoint"] or "default",
                      sampling_ratio=self.config["sampling_ratio"])

    async def stop(self) -> None:
        """Send the spans still queued (within ``timeout``) and stop the export thread."""
        if self.provider is not None:
            import asyncio

            provider, self.provider = self.provider, None
            await asyncio.to_thread(provider.shutdown)

    @property
    def tracer(self) -> Tracer:
        if self._tracer is None:
            raise RuntimeError("the otel exporter is not started")
        return self._tracer


def _driver(kernel: KernelHandle) -> OtelExporter:
    driver = kernel.drivers("exporters")["otel"]
    assert isinstance(driver, OtelExporter)
    return driver
