"""Traces (the ``otel`` exporter): a span tree per request, W3C trace context, sampling,
trace ids in log lines, and real OTLP exports over HTTP and gRPC to loopback receivers."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from inferno.kernel import ConfigError
from inferno.kernel.logs import configure_logging
from inferno.plugins.exporters.otel_setup import parse_headers
from tests.model_files import write_tiny_gguf
from tests.servers import ServerThread

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
EMBED = {"model": "minilm", "input": ["hello world"]}
COMPLETE = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0,
            "stream": True}


class Traced:
    """A server with the ``otel`` exporter whose spans are kept in memory."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.spans = InMemorySpanExporter()
        driver = server.kernel.drivers("exporters")["otel"]  # type: ignore[union-attr]
        driver.provider.add_span_processor(SimpleSpanProcessor(self.spans))

    @property
    def url(self) -> str:
        return self.server.url

    def finished(self) -> list[ReadableSpan]:
        """The spans ended so far, once no more arrive: the server ends a request's span
        after the client has its last byte."""
        import time

        seen, deadline = -1, time.monotonic() + 10
        while time.monotonic() < deadline:
            count = len(self.spans.get_finished_spans())
            if count == seen and count:
                break
            seen = count
            time.sleep(0.15)
        spans = list(self.spans.get_finished_spans())
        self.spans.clear()
        return spans


def otel_server(data: Path, tiny: Path, *sets: str) -> ServerThread:
    return ServerThread("edge", data, sets=[f'plugins.models.entries.tiny.path="{tiny}"',
                                            'exporters.otel.exporter="none"', *sets])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context_length=1024)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Traced]:
    with otel_server(tmp_path_factory.mktemp("data"), tiny_model,
                     "protocols.websocket.port=0") as server:
        yield Traced(server)


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Logging as the enterprise profile sets it up, in JSON lines, read back as dicts."""
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    configure_logging("console", "warning")
    logging.getLogger().handlers.clear()


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, \
            session.post(url, json=body, headers=headers or {}) as response:
        return response.status, await response.text()


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans
            if span.parent is not None and span.parent.span_id == parent.context.span_id}


def within(inner: ReadableSpan, outer: ReadableSpan) -> bool:
    return outer.start_time <= inner.start_time <= inner.end_time <= outer.end_time


# --------------------------------------------------------------------------- the span tree


async def test_an_embeddings_request_is_a_server_span_over_a_call_span_and_its_steps(
        traced: Traced) -> None:
    status, _ = await post(traced.url + "/v1/embeddings", EMBED)
    assert status == 200
    spans = traced.finished()
    root = by_name(spans)["POST /v1/embeddings"]
    assert root.parent is None
    assert root.kind is SpanKind.SERVER
    assert root.attributes["http.route"] == "/v1/embeddings"
    assert root.attributes["http.response.status_code"] == 200
    calls = children(spans, root)
    assert set(calls) == {"access", "embeddings minilm"}
    call = calls["embeddings minilm"]
    assert call.attributes["gen_ai.operation.name"] == "embeddings"
    assert call.attributes["gen_ai.request.model"] == "minilm"
    assert call.attributes["gen_ai.usage.input_tokens"] > 0
    assert call.attributes["inferno.status_code"] == 200
    steps = children(spans, call)
    assert {"auth", "embed"} <= set(steps)
    assert steps["auth"].end_time <= steps["embed"].start_time
    assert all(within(step, call) for step in steps.values())
    assert within(call, root)


async def test_a_streamed_completion_has_queue_load_prompt_and_generation_steps_in_order(
        traced: Traced) -> None:
    status, text = await post(traced.url + "/v1/completions", COMPLETE)
    assert status == 200
    assert "[DONE]" in text
    spans = traced.finished()
    root = by_name(spans)["POST /v1/completions"]
    call = children(spans, root)["text_completion tiny"]
    steps = children(spans, call)
    order = ["auth", "queue.wait", "model.load", "prompt.eval", "generate"]
    assert set(order) <= set(steps)
    for earlier, later in itertools.pairwise(order):
        assert steps[earlier].end_time <= steps[later].start_time, (earlier, later)
    assert within(steps["generate"], call)
    assert within(call, root)
    assert call.attributes["gen_ai.operation.name"] == "text_completion"
    assert call.attributes["gen_ai.request.max_tokens"] == 8
    assert call.attributes["gen_ai.usage.output_tokens"] > 0
    assert call.attributes["gen_ai.usage.input_tokens"] > 0
    assert call.attributes["gen_ai.response.finish_reasons"] in (("length",), ("stop",))


async def test_no_prompt_or_output_text_reaches_an_attribute(traced: Traced) -> None:
    secret = "the launch code is swordfish"
    await post(traced.url + "/v1/completions", {**COMPLETE, "prompt": secret})
    values = [str(value) for span in traced.finished()
              for value in (span.attributes or {}).values()]
    assert values
    assert not [value for value in values if "swordfish" in value]


async def test_a_failed_call_records_its_status_and_a_server_error_is_an_error_span(
        traced: Traced) -> None:
    status, _ = await post(traced.url + "/v1/embeddings", {"model": "nope", "input": ["x"]})
    assert status == 404
    spans = by_name(traced.finished())
    assert spans["POST /v1/embeddings"].attributes["http.response.status_code"] == 404
    call = spans["embeddings"]
    assert call.attributes["inferno.status_code"] == 404
    assert call.attributes["error.type"] == "model_not_found"
    assert call.status.status_code is StatusCode.UNSET


async def test_a_request_no_route_matches_is_named_by_its_method_and_not_its_path(
        traced: Traced) -> None:
    async with aiohttp.ClientSession() as session, \
            session.get(traced.url + "/v1/no/such/route/key-s3cr3t") as response:
        assert response.status == 404
    (span,) = traced.finished()
    assert span.name == "GET"
    assert span.attributes["http.response.status_code"] == 404
    assert "http.route" not in span.attributes
    assert "s3cr3t" not in repr(dict(span.attributes))


# --------------------------------------------------------------------------- trace context


async def test_an_incoming_traceparent_is_continued(traced: Traced) -> None:
    await post(traced.url + "/v1/embeddings", EMBED, {"traceparent": TRACEPARENT})
    root = by_name(traced.finished())["POST /v1/embeddings"]
    assert format_trace_id(root.context.trace_id) == TRACE_ID
    assert root.parent is not None
    assert format_span_id(root.parent.span_id) == PARENT_ID
    assert root.parent.is_remote


async def test_a_websocket_message_is_a_root_span_continuing_the_upgrades_traceparent(
        traced: Traced) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(
            traced.url + "/v1/ws", headers={"traceparent": TRACEPARENT}) as ws:
        await ws.send_json({"type": "embeddings", "id": 1, **EMBED})
        done = await ws.receive_json(timeout=30)
    assert done["type"] == "done"
    spans = traced.finished()
    call = by_name(spans)["embeddings minilm"]
    assert call.kind is SpanKind.SERVER
    assert call.attributes["inferno.protocol"] == "websocket"
    assert format_trace_id(call.context.trace_id) == TRACE_ID
    assert format_span_id(call.parent.span_id) == PARENT_ID  # type: ignore[union-attr]
    assert "embed" in children(spans, call)


async def test_the_trace_id_is_in_the_log_lines_of_the_request(
        traced: Traced, log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    await post(traced.url + "/api/v1/models/minilm/unload", {})
    status, _ = await post(traced.url + "/api/v1/models/minilm/load", {},
                           {"traceparent": TRACEPARENT})
    assert status == 200
    loaded = [line for line in log_lines() if line["event"] == "model loaded"]
    assert loaded
    assert {line.get("trace_id") for line in loaded} == {TRACE_ID}


@pytest.fixture(scope="module")
def unsampled(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Traced]:
    with otel_server(tmp_path_factory.mktemp("data"), tiny_model,
                     "exporters.otel.sampling_ratio=0") as server:
        yield Traced(server)


async def test_a_sampling_ratio_of_zero_records_nothing(unsampled: Traced) -> None:
    status, _ = await post(unsampled.url + "/v1/embeddings", EMBED)
    assert status == 200
    assert unsampled.finished() == []


async def test_a_trace_the_caller_sampled_is_recorded_whatever_the_ratio(
        unsampled: Traced) -> None:
    await post(unsampled.url + "/v1/embeddings", EMBED, {"traceparent": TRACEPARENT})
    assert "embeddings minilm" in by_name(unsampled.finished())


# --------------------------------------------------------------------------- OTLP exports


def attributes_of(span: Any) -> dict[str, Any]:
    """An OTLP protobuf span's attributes as plain values."""
    values: dict[str, Any] = {}
    for pair in span.attributes:
        kind = pair.value.WhichOneof("value")
        value = getattr(pair.value, kind)
        values[pair.key] = list(v.string_value for v in value.values) \
            if kind == "array_value" else value
    return values


def decoded_spans(requests: list[Any]) -> dict[str, Any]:
    return {span.name: span for request in requests for resource in request.resource_spans
            for scope in resource.scope_spans for span in scope.spans}


async def test_spans_reach_an_otlp_http_receiver_as_protobuf(
        tmp_path: Path, tiny_model: Path) -> None:
    received: list[Any] = []
    seen_headers: list[str] = []

    async def traces(request: web.Request) -> web.Response:
        seen_headers.append(request.headers.get("Authorization", ""))
        assert request.content_type == "application/x-protobuf"
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse()
                            .SerializeToString(), content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        with otel_server(tmp_path / "data", tiny_model,
                         'exporters.otel.exporter="otlp_http"',
                         f'exporters.otel.endpoint="http://127.0.0.1:{port}/v1/traces"',
                         'exporters.otel.headers="authorization=Bearer%20collector-key"',
                         'exporters.otel.service_name="inferno-test"') as server:
            status, _ = await post(server.url + "/v1/embeddings", EMBED,
                                   {"traceparent": TRACEPARENT})
            assert status == 200
            driver = server.kernel.drivers("exporters")["otel"]  # type: ignore[union-attr]
            assert await asyncio.to_thread(driver.provider.force_flush)
    finally:
        await runner.cleanup()
    assert seen_headers
    assert set(seen_headers) == {"Bearer collector-key"}
    resource = received[0].resource_spans[0].resource
    assert {"key": "service.name", "value": "inferno-test"} in [
        {"key": a.key, "value": a.value.string_value} for a in resource.attributes]
    spans = decoded_spans(received)
    assert {"POST /v1/embeddings", "embeddings minilm", "auth", "embed"} <= set(spans)
    root = spans["POST /v1/embeddings"]
    assert root.trace_id.hex() == TRACE_ID
    assert root.parent_span_id.hex() == PARENT_ID
    call = spans["embeddings minilm"]
    assert call.parent_span_id == root.span_id
    assert attributes_of(call)["gen_ai.request.model"] == "minilm"
    assert attributes_of(root)["http.response.status_code"] == 200


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A gRPC OTLP receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.received: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.received.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_an_otlp_grpc_receiver(tmp_path: Path, tiny_model: Path) -> None:
    collector = Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    try:
        with otel_server(tmp_path / "data", tiny_model, 'exporters.otel.exporter="otlp_grpc"',
                         f'exporters.otel.endpoint="http://127.0.0.1:{port}"') as server:
            status, _ = server.run(post(server.url + "/v1/completions", COMPLETE))
            assert status == 200
            driver = server.kernel.drivers("exporters")["otel"]  # type: ignore[union-attr]
            assert driver.provider.force_flush()
    finally:
        receiver.stop(None)
    spans = decoded_spans(collector.received)
    assert {"POST /v1/completions", "text_completion tiny", "generate"} <= set(spans)
    assert attributes_of(spans["text_completion tiny"])[
        "gen_ai.response.finish_reasons"] in (["length"], ["stop"])


# --------------------------------------------------------------------------- configuration


def test_headers_are_name_value_pairs_with_percent_encoded_values() -> None:
    assert parse_headers("Authorization=Bearer%20k1, x-team = a%2Cb,") == {
        "authorization": "Bearer k1", "x-team": "a,b"}


def test_malformed_headers_are_a_config_error_that_does_not_quote_them(make_kernel: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        make_kernel({"exporters": {"otel": {"headers": "api-key-s3cr3t"}}})
    assert "exporters.otel.headers" in str(raised.value)
    assert "s3cr3t" not in str(raised.value)


def test_the_headers_are_masked_in_the_configuration_others_see(make_kernel: Any) -> None:
    kernel = make_kernel({"exporters": {"otel": {"headers": "authorization=s3cr3t"}}})
    shown = dict(kernel.config["exporters"]["otel"])
    assert shown["headers"] != "authorization=s3cr3t"
    assert "s3cr3t" not in repr(shown)


def test_the_console_exporter_writes_spans_to_stderr_not_stdout(
        make_kernel: Any, run_kernel: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from inferno.plugins.gateway.calls import Call

    kernel = make_kernel({"exporters": {"otel": {"exporter": "console"}}}, base="edge")
    run_kernel(kernel, lambda k: k.service("gateway").run(Call("models.list", protocol="test")))
    out, err = capsys.readouterr()
    assert '"name": "models.list"' in err
    assert '"name": "models.list"' not in out
