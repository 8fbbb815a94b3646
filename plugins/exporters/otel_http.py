"""The HTTP server span: one per request, continuing the caller's W3C ``traceparent``.

It runs inside the server's request-id and error envelope, so errors reach it as
exceptions (``ApiError``, ``HTTPException``, a bug) that the envelope will turn into the
response: their status is the one recorded. The gateway calls the route makes become its
children (``otel_calls``), since the span is current while the route runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from inferno.plugins.protocols.web import status_of

if TYPE_CHECKING:
    from .otel import OtelExporter

PROPAGATOR = TraceContextTextMapPropagator()
#: The request's trace id (32 hex digits), for lines logged after the request's context ended
#: (the access log).
TRACE_ID = web.RequestKey("trace_id", str)
#: Methods named as they are; any other is ``_OTHER`` (a client picks the token).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT",
                     "TRACE"})


def trace_id_of(span: trace.Span) -> str | None:
    """The span's trace id as logs and trace back ends show it, if the span is recorded."""
    context = span.get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return trace.format_trace_id(context.trace_id)


def http_middleware(driver: OtelExporter) -> Any:
    """An aiohttp middleware that makes the request's ``SERVER`` span."""

    @web.middleware
    async def tracing(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            # a connection lives for hours: each of its messages is a trace of its own
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        method = request.method if request.method in METHODS else "_OTHER"
        name = f"{method} {route}" if route else method
        # the route template, never the path: a path is what the caller typed
        attributes: dict[str, Any] = {"http.request.method": method,
                                      "url.scheme": request.scheme}
        if route:
            attributes["http.route"] = route
        with driver.tracer.start_as_current_span(
                name, context=PROPAGATOR.extract(request.headers),
                kind=trace.SpanKind.SERVER, attributes=attributes,
                record_exception=False, set_status_on_exception=False) as span:
            trace_id = trace_id_of(span)
            if trace_id is None:
                return await handler(request)
            request[TRACE_ID] = trace_id
            status = 500
            try:
                with structlog.contextvars.bound_contextvars(trace_id=trace_id):
                    response = await handler(request)
                status = response.status
                return response
            except BaseException as exc:
                status = status_of(exc)
                raise
            finally:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(trace.StatusCode.ERROR)
                    span.set_attribute("error.type", str(status))

    return tracing
