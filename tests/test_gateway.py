"""The gateway every protocol shares: checked bodies, tools, queues and middlewares, with a
real kernel and the demo models where a model is involved."""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

import pytest

from inferno.kernel import hookimpl
from inferno.plugins.gateway.bodies import (
    parse_chat,
    parse_completion,
    parse_embeddings,
    parse_keep_alive,
)
from inferno.plugins.gateway.calls import Call, Delta, Final
from inferno.plugins.gateway.errors import ApiError
from inferno.plugins.gateway.queues import Queues
from inferno.plugins.gateway.tools import parse_tools, rewrite_turns

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


# --------------------------------------------------------------------------- bodies


@pytest.mark.parametrize(("body", "param", "words"), [
    ([], None, "must be a JSON object"),
    ({"messages": CHAT["messages"]}, "model", "model is required"),
    ({**CHAT, "messages": []}, "messages", "empty list"),
    ({**CHAT, "messages": "hi"}, "messages", "non-empty list"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "integer"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]", "'image_url' parts are not supported"),
    ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
     "required"),
    ({**CHAT, "max_tokens": -3}, "max_tokens", "positive integer"),
    ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens", "positive integer"),
    ({**CHAT, "max_tokens": "ten"}, "max_tokens", "positive integer"),
    ({**CHAT, "temperature": "hot"}, "temperature", "must be a number"),
    ({**CHAT, "seed": 1.5}, "seed", "must be an integer"),
    ({**CHAT, "n": 2}, "n", "n must be 1"),
    ({**CHAT, "stream": "yes"}, "stream", "true or false"),
    ({**CHAT, "response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {}}},
     "response_format", "schema"),
    ({**CHAT, "temprature": 0.5}, "temprature", "unknown field 'temprature'"),
    ({**CHAT, "logprobs": True}, "logprobs", "not supported"),
    ({**CHAT, "keep_alive": "soon"}, "keep_alive", "duration"),
    ({**CHAT, "tools": WEATHER, "tool_choice": {"type": "function",
                                                 "function": {"name": "nope"}}},
     "tool_choice", "not among the tools"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name", "letters, digits"),
])
def test_a_bad_chat_body_names_the_field(body: Any, param: str | None, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_chat(body)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert words in caught.value.message
    assert caught.value.envelope()["error"]["type"] == "invalid_request_error"


def test_a_good_chat_body_becomes_a_plan() -> None:
    plan = parse_chat({**CHAT, "max_completion_tokens": 7, "temperature": 0, "stop": "\n",
                       "response_format": {"type": "json_object"}, "keep_alive": "5m",
                       "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "developer", "content": "be brief"},
                                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}]})
    assert plan.params == {"max_tokens": 7, "temperature": 0, "stop": "\n",
                           "response_format": "json"}
    assert plan.messages == [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "a\nb"}]
    assert (plan.stream, plan.include_usage, plan.keep_alive) == (True, True, 300.0)


def test_completion_and_embedding_bodies() -> None:
    assert parse_completion({"model": "m", "prompt": ["once"]}).prompt == "once"
    with pytest.raises(ApiError, match="token arrays") as caught:
        parse_completion({"model": "m", "prompt": [1, 2]})
    assert caught.value.param == "prompt"
    assert parse_embeddings({"model": "m", "input": "x"}).inputs == ["x"]
    with pytest.raises(ApiError, match=r"input\[1\]"):
        parse_embeddings({"model": "m", "input": ["x", 3]})
    with pytest.raises(ApiError, match="encoding_format"):
        parse_embeddings({"model": "m", "input": "x", "encoding_format": "hex"})


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (30, 30.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25),
    (-1, -1.0), ("-1", -1.0), ("0", 0.0)])
def test_keep_alive_durations(value: Any, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


# --------------------------------------------------------------------------- tools


def test_a_named_tool_choice_allows_that_tool_once() -> None:
    tools = parse_tools([*WEATHER, {"type": "function", "function": {"name": "other"}}],
                        {"type": "function", "function": {"name": "get_weather"}})
    assert tools is not None
    schema = tools.schema()
    calls = schema["properties"]["tool_calls"]
    assert calls["maxItems"] == 1
    assert [option["properties"]["name"]["const"] for option in calls["items"]["anyOf"]] \
        == ["get_weather"]
    auto = parse_tools(WEATHER, "auto")
    assert auto is not None
    assert "anyOf" in auto.schema()


def test_tool_answers_parse_into_calls_or_content() -> None:
    tools = parse_tools(WEATHER, "auto")
    assert tools is not None
    content, calls = tools.parse('{"tool_calls": [{"name": "get_weather", '
                                 '"arguments": {"city": "Oslo"}}]}')
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather",
                                                                   {"city": "Oslo"})]
    assert calls[0].id.startswith("call_")
    assert tools.parse('{"content": "It is sunny."}') == ("It is sunny.", ())
    assert tools.parse('{"tool_calls": [{"na') == ('{"tool_calls": [{"na', ())  # cut short


def test_earlier_tool_turns_are_rewritten_for_any_chat_template() -> None:
    turns = rewrite_turns([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        {"role": "user", "content": "And tomorrow?"}])
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert json.loads(turns[1]["content"]) == {"tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    assert turns[2]["content"] == "Result of get_weather (call_1): rain\n\nAnd tomorrow?"


# --------------------------------------------------------------------------- queues


async def test_a_full_queue_refuses_at_once_and_a_freed_turn_passes_on() -> None:
    queues = Queues(concurrency=1, limit=1, timeout=5, retry_after=3)
    first, second = queues.enter("m"), queues.enter("m")
    with pytest.raises(ApiError) as refused:
        queues.enter("m")
    assert (refused.value.status, refused.value.code, refused.value.retry_after) \
        == (503, "queue_full", 3)
    order = []

    async def take(ticket: Any, name: str, hold: float) -> None:
        async with ticket.turn() as waited:
            order.append((name, waited))
            await asyncio.sleep(hold)

    await asyncio.gather(take(first, "first", 0.2), take(second, "second", 0))
    assert [name for name, _ in order] == ["first", "second"]
    assert order[1][1] >= 0.15  # the second waited for the first: measured
    assert queues.stats()["m"] | {"wait_seconds_total": 0} == {
        "running": 0, "waiting": 0, "limit": 1, "concurrency": 1, "served": 2, "refused": 1,
        "wait_seconds_total": 0, "last_wait_seconds": round(order[1][1], 6)}


async def test_a_request_that_waits_too_long_is_refused_and_frees_its_place() -> None:
    queues = Queues(concurrency=1, limit=1, timeout=0.1, retry_after=1)
    holder, waiter = queues.enter("m"), queues.enter("m")
    async with holder.turn():
        with pytest.raises(ApiError) as timed_out:
            async with waiter.turn():
                pass
        assert timed_out.value.code == "queue_timeout"
        queues.enter("m").release()  # its place is free again; leaving early frees it too
    assert queues.models["m"].running == 0


async def test_a_higher_priority_takes_the_next_turn_and_equals_keep_their_order() -> None:
    queues = Queues(concurrency=1, limit=4, timeout=5, retry_after=1)
    holder = queues.enter("m")
    tickets = [("low", queues.enter("m", -5)), ("first", queues.enter("m")),
               ("high", queues.enter("m", 10)), ("second", queues.enter("m"))]
    with pytest.raises(ApiError):  # a full queue refuses even the highest priority
        queues.enter("m", 100)
    order: list[str] = []

    async def take(name: str, ticket: Any) -> None:
        async with ticket.turn():
            order.append(name)
            await asyncio.sleep(0.01)

    async with holder.turn():
        waiting = [asyncio.ensure_future(take(name, ticket)) for name, ticket in tickets]
        await asyncio.sleep(0.05)
        assert order == []
    await asyncio.gather(*waiting)
    assert order == ["high", "first", "second", "low"]
    assert queues.models["m"].priority == {}


# --------------------------------------------------------------------------- with a kernel


class Recorder:
    """A plugin contributing two middlewares: one refuses a model, both record the order."""

    seen: ClassVar[list[str]] = []

    class Outer:
        order = 10

        async def __call__(self, call: Call, handler: Any) -> Any:
            Recorder.seen.append(f"outer:{call.operation}")
            return await handler(call)

    class Refuser:
        order = 20

        async def __call__(self, call: Call, handler: Any) -> Any:
            Recorder.seen.append(f"refuser:{call.operation}")
            if call.model == "forbidden":
                raise ApiError(403, "not for you", code="forbidden")
            return await handler(call)

    @staticmethod
    @hookimpl
    def inferno_request_middleware(kernel: Any) -> list[Any]:
        return [Recorder.Refuser(), Recorder.Outer()]


@pytest.fixture
def edge_kernel(make_kernel: Any) -> Any:
    return make_kernel(None, base="edge", plugins={"recorder": Recorder},
                       sets=["plugins.models.watch_interval=0"])


async def test_middlewares_wrap_every_call_in_their_order(edge_kernel: Any) -> None:
    Recorder.seen.clear()
    async with edge_kernel.running(protocols=False):
        gateway = edge_kernel.service("gateway")
        listed = await gateway.run(Call("models.list", {}))
        assert "gemma-3-270m" in [row["name"] for row in listed.value]
        with pytest.raises(ApiError, match="not for you"):
            await gateway.run(Call("chat", {**CHAT, "model": "forbidden"}))
    assert Recorder.seen == ["outer:models.list", "refuser:models.list", "outer:chat",
                             "refuser:chat"]


async def test_generation_errors_and_cancellation(edge_kernel: Any) -> None:
    async with edge_kernel.running(protocols=False):
        gateway = edge_kernel.service("gateway")
        with pytest.raises(ApiError) as unknown:
            await gateway.run(Call("chat", {**CHAT, "model": "no-such-model"}))
        assert (unknown.value.status, unknown.value.param) == (404, "model")
        long = {"model": "gemma-3-270m", "prompt": "word " * 40000, "max_tokens": 4}
        reply = await gateway.run(Call("completion", long))
        with pytest.raises(ApiError) as overflow:
            await reply.start()
        await reply.aclose()
        assert (overflow.value.status, overflow.value.code) == (400, "context_length_exceeded")
        assert "context size" in overflow.value.message

        reply = await gateway.run(Call("completion", {"model": "gemma-3-270m", "max_tokens": 500,
                                                      "prompt": "Once upon a time",
                                                      "temperature": 0}))
        events = []
        async for event in reply:
            events.append(event)
            if len(events) == 3:
                break
        await reply.aclose()
        model = edge_kernel.service("models").residents["gemma-3-270m"].current.model
        decoded = model.decoded_tokens
        await asyncio.sleep(0.3)
        assert model.decoded_tokens == decoded < 20  # stopped within a decode step
        assert gateway.queues.stats()["gemma-3-270m"]["running"] == 0


async def test_a_tool_call_is_generated_under_its_schema(edge_kernel: Any) -> None:
    async with edge_kernel.running(protocols=False):
        gateway = edge_kernel.service("gateway")
        reply = await gateway.run(Call("chat", {
            "model": "gemma-3-270m", "temperature": 0, "max_tokens": 40, "tools": WEATHER,
            "tool_choice": "required",
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}))
        text, final = await reply.collect()
    assert isinstance(final, Final)
    assert final.finish_reason == "tool_calls"
    assert text == ""
    (call,) = final.tool_calls
    assert call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)
    assert final.usage["completion_tokens"] > 0
    assert not isinstance(final, Delta)


async def test_a_reply_closed_before_it_started_gives_its_place_back(edge_kernel: Any) -> None:
    async with edge_kernel.running(protocols=False):
        gateway = edge_kernel.service("gateway")
        reply = await gateway.run(Call("completion", {"model": "gemma-3-270m", "prompt": "a",
                                                      "max_tokens": 2}))
        assert edge_kernel.inflight == 1  # a stream is in flight until it is done with
        await reply.aclose()
        assert gateway.queues.stats()["gemma-3-270m"]["running"] == 0
        assert edge_kernel.inflight == 0
        reply = await gateway.run(Call("completion", {"model": "gemma-3-270m", "prompt": "a",
                                                      "max_tokens": 2}))
        await reply.collect()  # iterated to the end: released without aclose
        assert edge_kernel.inflight == 0


async def test_embedding_usage_counts_the_tokens_the_model_read(edge_kernel: Any) -> None:
    texts = ["a short one", "a somewhat longer sentence about rivers and mountains"]
    async with edge_kernel.running(protocols=False):
        gateway = edge_kernel.service("gateway")
        reply = await gateway.run(Call("embeddings", {"model": "minilm", "input": texts}))
        model = edge_kernel.service("models").residents["minilm"].current.model
        expected = sum(model.count_tokens(text) for text in texts)
    assert reply.value["usage"] == {"prompt_tokens": expected, "total_tokens": expected}
    assert expected > 10
    assert [len(row["embedding"]) for row in reply.value["data"]] == [384, 384]


async def test_embedding_requests_that_wait_together_run_as_one_batch(edge_kernel: Any) -> None:
    texts = [f"sentence number {index} about a river" for index in range(12)]
    async with edge_kernel.running(protocols=False):
        gateway = edge_kernel.service("gateway")
        alone = [(await gateway.run(Call("embeddings", {"model": "minilm", "input": text})))
                 .value for text in texts]
        model = edge_kernel.service("models").residents["minilm"].current.model
        calls: list[list[str]] = []
        real = model.embed_counted

        async def recorded(inputs: Any) -> Any:
            calls.append(list(inputs))
            if "poison" in inputs:  # as a backend refuses one input of a batch
                raise ApiError(400, "poison is not embeddable", param="input")
            return await real(inputs)

        model.embed_counted = recorded
        together = await asyncio.gather(*(
            gateway.run(Call("embeddings", {"model": "minilm", "input": text}))
            for text in texts))
        assert [len(batch) for batch in calls] == [12]  # one backend call for twelve
        calls.clear()
        mixed = await asyncio.gather(
            gateway.run(Call("embeddings", {"model": "minilm", "input": "fine"})),
            gateway.run(Call("embeddings", {"model": "minilm", "input": "poison"})),
            return_exceptions=True)
    for one, batched in zip(alone, together, strict=True):
        assert batched.value["usage"] == one["usage"]
        assert max(abs(a - b) for a, b in zip(batched.value["data"][0]["embedding"],
                                              one["data"][0]["embedding"], strict=True)) < 1e-5
    assert calls == [["fine", "poison"], ["fine"], ["poison"]]  # the batch, then one by one
    assert len(mixed[0].value["data"]) == 1  # a bad neighbour fails only its own request
    assert isinstance(mixed[1], ApiError)
    assert mixed[1].message == "poison is not embeddable"


class LateRefuser:
    """A middleware that fails after the stream was made (as a cache might while storing)."""

    order = 50

    async def __call__(self, call: Call, handler: Any) -> Any:
        await handler(call)
        raise ApiError(500, "failed after the handler", code="late")

    @staticmethod
    @hookimpl
    def inferno_request_middleware(kernel: Any) -> Any:
        return LateRefuser()


async def test_a_stream_a_middleware_drops_gives_its_queue_place_back(make_kernel: Any) -> None:
    kernel = make_kernel(None, base="edge", plugins={"late": LateRefuser},
                         sets=["plugins.models.watch_interval=0"])
    async with kernel.running(protocols=False):
        gateway = kernel.service("gateway")
        with pytest.raises(ApiError, match="failed after the handler"):
            await gateway.run(Call("completion", {"model": "gemma-3-270m", "prompt": "a"}))
        assert gateway.queues.stats()["gemma-3-270m"]["running"] == 0
        assert kernel.inflight == 0


async def test_a_stream_remembers_the_error_that_ended_it() -> None:
    from inferno.plugins.gateway.calls import Delta, StreamReply
    from inferno.plugins.gateway.errors import ApiError

    async def failing() -> Any:
        yield Delta("one", 1)
        raise ApiError(503, "the backend went away", code="backend_failed")

    reply = StreamReply("m", failing())
    seen: list[Any] = []

    async def read() -> None:
        async for event in reply:
            seen.append(event)

    with pytest.raises(ApiError):
        await read()
    assert [e.text for e in seen] == ["one"]
    assert isinstance(reply.error, ApiError)
    assert reply.error.code == "backend_failed"

    async def refused() -> Any:
        raise ApiError(400, "prompt too long", code="context_length_exceeded")
        yield  # pragma: no cover - makes this a generator

    early = StreamReply("m", refused())
    with pytest.raises(ApiError):
        await early.start()
    assert early.error is not None
