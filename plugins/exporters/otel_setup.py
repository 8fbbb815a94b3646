"""Building the ``otel`` exporter's tracer provider from its configuration.

The SDK's own defaults would come from ``OTEL_*`` environment variables; here every
choice comes from ``[exporters.otel]`` instead, so a profile says all there is.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

EXPORTERS = ("otlp_http", "otlp_grpc", "console", "none")
DEFAULT_ENDPOINTS = {"otlp_http": "http://localhost:4318/v1/traces",
                     "otlp_grpc": "http://localhost:4317"}


def parse_headers(text: str) -> dict[str, str]:
    """``name=value,name2=value2`` (values percent-encoded) as a dict; ``ValueError`` that
    names the bad pair's position, never its text (it may hold an API key)."""
    headers: dict[str, str] = {}
    for position, pair in enumerate(text.split(","), start=1):
        if not pair.strip():
            continue
        name, equals, value = pair.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"pair {position} is not name=value; write headers as "
                             f"\"name=value,name2=value2\"")
        headers[unquote(name.strip()).lower()] = unquote(value.strip())
    return headers


def build_provider(config: Mapping[str, Any]) -> TracerProvider:
    """A provider with the configured sampler, resource and exporter (batched: exports run
    on the SDK's thread, never on the event loop)."""
    from importlib.metadata import version

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({"service.name": str(config["service_name"]),
                                "service.version": version("inferno")})
    sampler = ParentBased(TraceIdRatioBased(float(config["sampling_ratio"])))
    provider = TracerProvider(resource=resource, sampler=sampler)
    exporter = span_exporter(config)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def span_exporter(config: Mapping[str, Any]) -> SpanExporter | None:
    """The SDK exporter ``config["exporter"]`` names (``None`` for ``none``)."""
    kind = str(config["exporter"])
    endpoint = str(config["endpoint"]) or DEFAULT_ENDPOINTS.get(kind, "")
    headers = parse_headers(str(config["headers"]))
    timeout = float(config["timeout"])
    if kind == "otlp_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, headers=headers, timeout=timeout)
    if kind == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        # http:// is a plaintext channel, https:// (or no scheme) TLS
        return GrpcSpanExporter(endpoint=endpoint, headers=headers, timeout=timeout,
                                insecure=endpoint.startswith("http://"))
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stderr: standard output carries the stdin protocol's answers
        return ConsoleSpanExporter(out=sys.stderr)
    return None
