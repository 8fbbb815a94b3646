"""The gateway call span and its children, timed from the marks the gateway leaves.

``TracingMiddleware`` runs outermost (order 50). Over HTTP its span is a child of the
request's server span; a WebSocket message or a stdin line has no request around it, so its
span is a root continuing the ``traceparent`` of the call's credentials (for WebSocket, the
upgrade request's headers). The children are made when the call is done with (for a stream,
when it is closed), each with the start and end times of ``call.marks``: no span is open
while tokens flow, so tracing costs a call a few span objects, not work per token.

``OperationMarker`` runs innermost: the gateway marks ``operation.start`` and ``.end``
around it, which is where the middlewares' own work ends and the operation's begins.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import trace

from inferno.plugins.gateway.calls import Call, Handler, StreamReply, ValueReply
from inferno.plugins.gateway.errors import from_exception

from .otel_http import PROPAGATOR, trace_id_of

if TYPE_CHECKING:
    from .otel import OtelExporter

#: GenAI semantic conventions' ``gen_ai.operation.name`` of the operations that run models.
GENAI_OPERATIONS = {"chat": "chat", "completion": "text_completion",
                    "embeddings": "embeddings"}
#: Span names of the middlewares' own work, by the middleware's name (its ``name``
#: attribute, else its class name); any other middleware's span is named by its name.
STAGES = {"security": "auth", "SecurityMiddleware": "auth",
          "rate_limits": "rate_limit", "RateLimitMiddleware": "rate_limit",
          "cache": "cache.lookup", "CacheMiddleware": "cache.lookup"}
#: Middlewares at or before this order observe calls (metrics, traces): no span of their own.
OBSERVERS = 100
#: Request parameters recorded as ``gen_ai.request.*`` (numbers only: never text).
REQUEST_PARAMETERS = ("max_tokens", "temperature", "top_p", "top_k", "seed",
                      "frequency_penalty", "presence_penalty")


class OperationMarker:
    """The innermost middleware: it does nothing, and the gateway marks when it ran."""

    order = 1_000_000
    name = "operation"

    async def __call__(self, call: Call, handler: Handler) -> Any:
        return await handler(call)


class TracingMiddleware:
    """A span per call, children per step, GenAI attributes from the reply."""

    order = 50
    name = "tracing"

    def __init__(self, driver: OtelExporter) -> None:
        self.driver = driver
        #: middleware name → span name of the stages traced (read from the gateway at the
        #: first call: the gateway is built after the middlewares are collected)
        self._stages: dict[str, str] | None = None

    async def __call__(self, call: Call, handler: Handler) -> Any:
        current = trace.get_current_span().get_span_context()
        if not current.is_valid and call.operation == "access":
            return await handler(call)  # a connection's check (a ping), not a request
        clock = Clock()
        if current.is_valid:
            parent, kind = None, trace.SpanKind.INTERNAL
        else:
            parent, kind = PROPAGATOR.extract(call.credentials.headers), trace.SpanKind.SERVER
        span = self.driver.tracer.start_span(
            call.operation, context=parent, kind=kind, start_time=clock.epoch(call.received),
            attributes={"inferno.operation": call.operation, "inferno.protocol": call.protocol,
                        "inferno.request_id": call.id})
        trace_id = trace_id_of(span)
        if trace_id is None:  # not sampled
            return await handler(call)
        call.state["trace_id"] = trace_id
        try:
            if structlog.contextvars.get_contextvars().get("trace_id") == trace_id:
                reply = await handler(call)  # the HTTP span bound it already
            else:
                with structlog.contextvars.bound_contextvars(trace_id=trace_id):
                    reply = await handler(call)
        except BaseException as exc:
            self.finish(span, call, clock, None, exc)
            raise
        if isinstance(reply, StreamReply):
            reply.on_close(lambda: self.finish(span, call, clock, reply, reply.error))
        else:
            self.finish(span, call, clock, reply, None)
        return reply

    def finish(self, span: trace.Span, call: Call, clock: Clock, reply: Any,
               error: BaseException | None) -> None:
        """Add the steps' spans and the attributes the outcome tells, and end the span."""
        now = time.time_ns()
        self._children(span, call, clock, now)
        status = 200
        if isinstance(error, Exception):
            api_error = from_exception(error)
            status = api_error.status
            span.set_attribute("error.type", api_error.code or str(status))
            if status >= 500:
                span.set_status(trace.StatusCode.ERROR, api_error.code or "")
        elif error is not None:
            span.set_attribute("inferno.cancelled", True)
        span.set_attribute("inferno.status_code", status)
        if "cache" in call.meta:
            span.set_attribute("inferno.cache", call.meta["cache"])
        operation = GENAI_OPERATIONS.get(call.operation)
        if operation is not None and reply is not None and reply.model:
            span.update_name(f"{operation} {reply.model}")
            span.set_attributes(genai_attributes(operation, call, reply))
        span.end(end_time=now)

    def _children(self, span: trace.Span, call: Call, clock: Clock, now: int) -> None:
        marks = call.marks
        tracer = self.driver.tracer
        context = trace.set_span_in_context(span)

        def child(name: str, start: float | None, end: float | None) -> None:
            if start is None:
                return
            tracer.start_span(name, context=context, start_time=clock.epoch(start)).end(
                end_time=clock.epoch(end) if end is not None else now)

        stages = self.stages()
        starts = sorted(stamp for label in (*stages, "operation")
                        if (stamp := marks.get(f"{label}.start")) is not None)
        for label, name in stages.items():
            start = marks.get(f"{label}.start")
            if start is None:
                continue
            # a middleware's own work ends where the next one's (or the operation) begins
            inner = next((stamp for stamp in starts if stamp > start), None)
            ends = [stamp for stamp in (marks.get(f"{label}.end"), inner) if stamp is not None]
            child(name, start, min(ends) if ends else None)
        if call.operation == "embeddings":
            child("embed", marks.get("operation.start"),
                  marks.get("done", marks.get("operation.end")))
            return
        load_end, first, done = marks.get("load.end"), marks.get("first_token"), \
            marks.get("done")
        child("queue.wait", marks.get("queue.start"), marks.get("queue.end"))
        child("model.load", marks.get("load.start"), load_end)
        child("prompt.eval", load_end, first if first is not None else done)
        child("generate", first, done)

    def stages(self) -> dict[str, str]:
        if self._stages is None:
            gateway = self.driver.context.kernel.service("gateway")
            stages: dict[str, str] = {}
            for middleware in gateway.middlewares:
                label = getattr(middleware, "name", type(middleware).__name__)
                if getattr(middleware, "order", 500) > OBSERVERS and label != "operation":
                    stages[label] = STAGES.get(label, label)
            self._stages = stages
        return self._stages


class Clock:
    """Turns ``time.perf_counter()`` stamps into epoch nanoseconds, with one offset taken when
    the call began (the two clocks drift apart only over hours)."""

    def __init__(self) -> None:
        self.offset = time.time_ns() - time.perf_counter_ns()

    def epoch(self, stamp: float) -> int:
        return int(stamp * 1e9) + self.offset


def genai_attributes(operation: str, call: Call, reply: Any) -> dict[str, Any]:
    """GenAI semantic-convention attributes: the canonical model, request parameters (numbers),
    token usage and finish reasons. Never the prompt or the output."""
    attributes: dict[str, Any] = {"gen_ai.operation.name": operation,
                                  "gen_ai.request.model": reply.model,
                                  "gen_ai.response.model": reply.model}
    body = call.body if isinstance(call.body, Mapping) else {}
    for key in REQUEST_PARAMETERS:
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attributes[f"gen_ai.request.{key}"] = value
    usage: Any = None
    if isinstance(reply, StreamReply):
        final = reply.final
        if final is not None:
            usage = final.usage
            attributes["gen_ai.response.finish_reasons"] = (final.finish_reason,)
        else:
            attributes["inferno.stream.closed_early"] = True
            attributes["gen_ai.usage.output_tokens"] = reply.streamed_tokens
    elif isinstance(reply, ValueReply) and isinstance(reply.value, Mapping):
        usage = reply.value.get("usage")
    if isinstance(usage, Mapping):
        for key, attribute in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                               ("completion_tokens", "gen_ai.usage.output_tokens")):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                attributes[attribute] = value
    return attributes
