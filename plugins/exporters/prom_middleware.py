"""Where the ``prometheus`` exporter's counters move: a gateway middleware that sees every
call of every protocol, and an aiohttp middleware that sees every HTTP request.

The gateway middleware runs first (order 100), so it also sees the calls that
authentication (200) and rate limits (300) refuse, and the ones the cache (400) answers.
Label values never come from a request: models are the registry's canonical names (``""``
when the call named none that exists), operations the gateway's own, routes the matched
route's pattern, methods the standard ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any

from aiohttp import web

from inferno.kernel import KernelHandle
from inferno.plugins.gateway.calls import Call, Delta, Final, Handler, StreamReply, ValueReply
from inferno.plugins.gateway.errors import ApiError, from_exception
from inferno.plugins.protocols.web import CLIENT_CLOSED, status_of

from .prom_metrics import LOAD_STAGES, Metrics

#: HTTP methods counted by name; any other token a client sends is counted as ``other``.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The status counted for a request whose client went away before it was answered.


def outcome(status: int) -> str:
    """The ``outcome`` label of a call refused with ``status``."""
    if status == 429:
        return "rate_limited"
    if status == 401:
        return "unauthorized"
    if status == 403:
        return "forbidden"
    return "client_error" if status < 500 else "server_error"


class MetricsMiddleware:
    """Counts every gateway call by operation, model, protocol and outcome, and observes
    its durations, tokens and model runs.

    An ``access`` call (a protocol asking whether the caller may go on) is not a request
    of its own: the operations it guards count themselves. It is counted only when it
    refuses, as operation ``access``: then it is the only trace of the request.
    """

    order = 100
    name = "metrics"

    def __init__(self, metrics: Metrics, kernel: KernelHandle) -> None:
        self.metrics = metrics
        self.kernel = kernel
        self._operations: Mapping[str, Any] | None = None

    async def __call__(self, call: Call, handler: Handler) -> Any:
        try:
            reply = await handler(call)
        except ApiError as exc:
            self._refused(call, exc.status, exc.code)
            raise
        except Exception as exc:  # an Inferno error the gateway turns into an ApiError later
            error = from_exception(exc)
            self._refused(call, error.status, error.code)
            raise
        except asyncio.CancelledError:  # its client went away
            self._refused(call, CLIENT_CLOSED, None)
            raise
        if call.operation == "access":
            return reply
        if isinstance(reply, StreamReply):
            return self._watched(call, reply)
        self._answered(call, reply)
        return reply

    # ------------------------------------------------------------------ labels

    def _operation(self, call: Call) -> str:
        if self._operations is None:
            self._operations = self.kernel.service("gateway").operations
        return call.operation if call.operation in self._operations else "unknown"

    def _model(self, call: Call, reply: Any = None) -> str:
        """The registry's name of the call's model, or ``""``: never what the client wrote."""
        named = getattr(reply, "model", "")
        if named:
            return str(named)
        return canonical_model(self.kernel, call.model)

    # ------------------------------------------------------------------ observations

    def _refused(self, call: Call, status: int, code: str | None) -> None:
        metrics = self.metrics
        if status == 429:
            metrics.rate_limited.inc()
        elif status in (401, 403):
            metrics.child(metrics.auth_failures, code or "unknown").inc()
        operation, model = self._operation(call), self._model(call)
        metrics.child(metrics.requests, operation, model, call.protocol, outcome(status)).inc()
        if call.operation != "access":
            metrics.child(metrics.request_duration, operation, model).observe(
                time.perf_counter() - call.received)

    def _answered(self, call: Call, reply: Any) -> None:
        operation, model = self._operation(call), self._model(call, reply)
        metrics = self.metrics
        metrics.child(metrics.requests, operation, model, call.protocol, "ok").inc()
        metrics.child(metrics.request_duration, operation, model).observe(
            time.perf_counter() - call.received)
        value = reply.value if isinstance(reply, ValueReply) else None
        usage = value.get("usage") if isinstance(value, Mapping) else None
        if not isinstance(usage, Mapping) or call.meta.get("cache") == "hit":
            return  # no model ran: a list, a status, or an answer from the cache
        metrics.child(metrics.model_runs, model, operation).inc()
        metrics.child(metrics.prompt_tokens, model).inc(_count(usage.get("prompt_tokens")))
        waited = value.get("queue_seconds") if isinstance(value, Mapping) else None
        if isinstance(waited, int | float):
            metrics.child(metrics.queue_wait, model).observe(waited)

    def _watched(self, call: Call, reply: StreamReply) -> StreamReply:
        """``reply`` behind a stream that notes how it ended; observed once it is closed."""
        failure: list[ApiError] = []
        watched = StreamReply(reply.model, _relay(reply, failure), kind=reply.kind)
        watched.created = reply.created

        async def closed() -> None:
            await reply.aclose()  # also when the watched stream was closed before it started
            self._streamed(call, watched, failure[0] if failure else None)

        watched.on_close(closed)
        return watched

    def _streamed(self, call: Call, reply: StreamReply, failure: ApiError | None) -> None:
        operation, model = self._operation(call), self._model(call, reply)
        metrics = self.metrics
        if failure is not None:
            self._refused(call, failure.status, failure.code)
        else:  # a stream closed before its end: its client went away
            label = "ok" if reply.final is not None else "client_error"
            metrics.child(metrics.requests, operation, model, call.protocol, label).inc()
            metrics.child(metrics.request_duration, operation, model).observe(
                time.perf_counter() - call.received)
        if call.meta.get("cache") == "hit":
            return  # no model ran
        final = reply.final
        usage: Mapping[str, Any] = final.usage if final is not None else {}
        completion = _count(usage.get("completion_tokens", reply.streamed_tokens))
        observe_generation(metrics, model, call.marks.get("admitted", call.received),
                           call.marks, completion)
        if "load.end" not in call.marks:
            return  # the model was never reached: refused, or its turn never came
        metrics.child(metrics.model_runs, model, operation).inc()
        metrics.child(metrics.prompt_tokens, model).inc(_count(usage.get("prompt_tokens")))
        metrics.child(metrics.completion_tokens, model).inc(completion)


def observe_generation(metrics: Metrics, model: str, start: float,
                       marks: Mapping[str, float], completion_tokens: int) -> None:
    """Queue wait, time to first token, inter-token latency and generation time from the
    marks the gateway left on the call (``Call.marks``), each when its marks are there."""
    if "queue.start" in marks and "queue.end" in marks:
        metrics.child(metrics.queue_wait, model).observe(marks["queue.end"] - marks["queue.start"])
    first, done = marks.get("first_token"), marks.get("done")
    if first is not None:
        metrics.child(metrics.first_token, model).observe(first - start)
    if done is not None:
        metrics.child(metrics.generation, model).observe(done - start)
    if first is not None and done is not None and completion_tokens >= 2:
        metrics.child(metrics.inter_token, model).observe((done - first) / (completion_tokens - 1))


async def _relay(reply: StreamReply, failure: list[ApiError]
                 ) -> AsyncIterator[Delta | Final]:
    """``reply``'s events, noting the error that ended it early (a prompt too long, a queue
    timeout) before it goes on to the protocol."""
    try:
        async with aclosing(aiter(reply)) as events:
            async for event in events:
                yield event
    except Exception as exc:
        failure.append(from_exception(exc))
        raise
    finally:
        await reply.aclose()


def canonical_model(kernel: KernelHandle, name: str | None) -> str:
    """The registry's name for ``name`` (a name or an alias), or ``""`` when it names no
    registered model. Two dictionary look-ups: no suggestions are made here."""
    if name is None:
        return ""
    try:
        registry = kernel.service("models").registry
    except LookupError:
        return ""
    entry = registry.entries.get(registry.aliases.get(name, name))
    return str(entry.name) if entry is not None else ""


def load_observer(metrics: Metrics, kernel: KernelHandle
                  ) -> tuple[Callable[[Any], None], Callable[[Any], None]]:
    """Handlers of ``model.loaded`` and ``model.failed`` events: every load counts, whether
    a request, an operator or a preload asked for it."""

    def loaded(event: Any) -> None:
        model = canonical_model(kernel, event.model)
        metrics.child(metrics.load, model).observe(float(event.seconds))

    def failed(event: Any) -> None:
        stage = event.stage if event.stage in LOAD_STAGES else "other"
        metrics.child(metrics.load_failures, canonical_model(kernel, event.model), stage).inc()

    return loaded, failed


def http_middleware(metrics: Metrics) -> Any:
    """Counts every HTTP request by route pattern, method and the status it was answered
    with. It runs inside the error envelope: a refusal passes through it as an exception,
    counted with the status the envelope answers, then raised on."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request],
                                                                 Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except BaseException as exc:
            status = status_of(exc)
            raise
        finally:
            route, method = route_of(request), request.method
            method = method if method in METHODS else "other"
            metrics.child(metrics.http_requests, route, method, str(status)).inc()
            if not getattr(request.match_info.handler, "long_lived", False):  # not sockets
                metrics.child(metrics.http_duration, route, method).observe(
                    time.perf_counter() - started)

    return middleware


def route_of(request: web.BaseRequest) -> str:
    """The matched route's pattern (``/api/v1/models/{name}``), or ``unmatched``: a path a
    client made up is never a label."""
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
