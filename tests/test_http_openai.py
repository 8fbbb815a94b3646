"""The OpenAI-compatible routes, driven by the official ``openai`` SDK (sync and async) and
raw HTTP against a real server with Gemma 3 270M and MiniLM."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.servers import ServerThread

GEMMA = "gemma-3-270m"
MINILM = "minilm"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Tell me about Paris."}]
#: Gemma's end-of-generation tokens (<eos>, <end_of_turn>, <eot>), banned to keep it going.
NO_END = {"1": -100, "106": -100, "212": -100}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}},
           {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                   "required": ["zone"]}}}]


@pytest.fixture(scope="module")
def client(edge_server: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=edge_server.url + "/v1", api_key="-", max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A 1 KiB body limit and keep-alive lines every 0.1 s, to see both quickly; one request
    at a time, so that a second one waits."""
    with ServerThread("edge", tmp_path_factory.mktemp("tight-data"), sets=[
            'protocols.http.max_body_size="1KiB"', "protocols.http.stream_keepalive=0.1",
            "backends.gguf.parallel=1"]
                      ) as server:
        yield server


def events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


# --------------------------------------------------------------------------- models


def test_the_model_list_names_every_registered_model_with_its_aliases(
        client: openai.OpenAI) -> None:
    models = {model.id: model for model in client.models.list()}
    assert set(models) == {GEMMA, MINILM}
    minilm = models[MINILM]
    assert (minilm.object, minilm.owned_by) == ("model", "inferno")
    assert minilm.created > 0
    assert minilm.model_extra["aliases"] == ["all-minilm-l6-v2"]
    assert minilm.model_extra["available"] is True


def test_a_model_is_found_by_its_alias(client: openai.OpenAI) -> None:
    assert client.models.retrieve("all-minilm-l6-v2").id == MINILM


def test_an_unknown_model_id_is_404_with_the_error_envelope(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert "no-such-model" in caught.value.message


def test_generating_with_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
    error = caught.value.response.json()["error"]
    assert "no-such-model" in error.pop("message")
    assert error == {"type": "not_found_error", "param": "model", "code": "model_not_found"}


# --------------------------------------------------------------------------- completions


def test_a_completion_continues_the_prompt_and_counts_its_tokens(
        client: openai.OpenAI) -> None:
    response = client.completions.create(model=GEMMA, prompt=PROMPT, max_tokens=8,
                                         temperature=0)
    assert response.id.startswith("cmpl-")
    assert (response.object, response.model) == ("text_completion", GEMMA)
    choice = response.choices[0]
    assert "France" in choice.text
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8
    assert response.model_extra["timings"]["time_to_first_token"] > 0


def test_a_streamed_completion_is_the_same_text_in_pieces(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=GEMMA, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=GEMMA, prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert len([text for text in texts if text]) > 1
    assert "".join(texts) == whole.choices[0].text
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage


def test_a_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    free = client.completions.create(model=GEMMA, prompt=PROMPT, max_tokens=12, temperature=0)
    stopped = client.completions.create(model=GEMMA, prompt=PROMPT, max_tokens=12,
                                        temperature=0, stop=["France"])
    assert stopped.choices[0].finish_reason == "stop"
    assert "France" not in stopped.choices[0].text
    assert free.choices[0].text.startswith(stopped.choices[0].text + "France")


def test_the_same_seed_gives_the_same_sample_and_other_seeds_others(
        client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=GEMMA, prompt="Once upon a time",
                                         max_tokens=12, temperature=1.0,
                                         seed=seed).choices[0].text
    first = sample(7)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) > 1


# --------------------------------------------------------------------------- chat


def test_a_chat_completion_answers_as_the_assistant(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=GEMMA, messages=CHAT, max_tokens=10,
                                              temperature=0)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    message = response.choices[0].message
    assert message.role == "assistant"
    assert message.content
    assert message.tool_calls is None
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 10


def test_a_chat_stream_sends_the_role_then_content_then_the_finish_reason(
        client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=GEMMA, messages=CHAT, max_tokens=12,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model=GEMMA, messages=CHAT, max_tokens=12,
                                                 temperature=0, stream=True))
    first, last = chunks[0].choices[0], chunks[-1].choices[0]
    assert (first.delta.role, first.delta.content) == ("assistant", "")
    assert (last.delta.content, last.finish_reason) == (None, "length")
    assert all(chunk.usage is None for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == whole.choices[0].message.content


def test_a_stream_asked_for_usage_ends_with_the_same_counts_as_a_whole_reply(
        client: openai.OpenAI, edge_server: Any) -> None:
    body = {"model": GEMMA, "messages": CHAT, "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**body)
    with httpx.stream("POST", edge_server.url + "/v1/chat/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}
                      ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = events(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)


def test_json_object_format_gives_content_that_parses(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Is the sky blue? Answer as JSON."},
                {"role": "assistant", "content": '{"answer": "yes"}'},
                {"role": "user", "content": "Is grass green? Answer as JSON."}]
    response = client.chat.completions.create(model=GEMMA, messages=messages, max_tokens=24,
                                              temperature=0,
                                              response_format={"type": "json_object"})
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_a_required_tool_call_comes_back_with_json_arguments(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=GEMMA, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=WEATHER, tool_choice="required", max_tokens=48, temperature=0)
    assert response.choices[0].finish_reason == "tool_calls"
    message = response.choices[0].message
    assert message.content is None
    (call,) = message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    required = "city" if call.function.name == "get_weather" else "zone"
    assert isinstance(arguments[required], str)


def test_a_named_tool_streamed_arrives_as_a_tool_calls_delta(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=GEMMA, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=WEATHER, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=48, temperature=0, stream=True))
    deltas = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or ()]
    (call,) = deltas
    assert (call.index, call.type, call.function.name) == (0, "function", "get_weather")
    assert "city" in json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# --------------------------------------------------------------------------- async client


async def test_the_async_client_chats_whole_and_streamed(edge_server: Any) -> None:
    async with openai.AsyncOpenAI(base_url=edge_server.url + "/v1", api_key="-") as sdk:
        whole = await sdk.chat.completions.create(model=GEMMA, messages=CHAT, temperature=0,
                                                  max_completion_tokens=8)
        stream = await sdk.chat.completions.create(model=GEMMA, messages=CHAT, max_tokens=8,
                                                   temperature=0, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert whole.usage.completion_tokens == 8
    assert text == whole.choices[0].message.content


async def test_the_async_client_completes_and_embeds(edge_server: Any) -> None:
    async with openai.AsyncOpenAI(base_url=edge_server.url + "/v1", api_key="-") as sdk:
        completion = await sdk.completions.create(model=GEMMA, prompt=PROMPT, max_tokens=6,
                                                  temperature=0)
        embedded = await sdk.embeddings.create(model=MINILM, input="Paris is in France.")
    assert completion.choices[0].text
    assert len(embedded.data[0].embedding) == 384


# --------------------------------------------------------------------------- embeddings


def test_embeddings_are_unit_vectors_where_similar_sentences_score_higher(
        client: openai.OpenAI) -> None:
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.",
             "Stock markets fell sharply today."]
    response = client.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    assert (response.object, response.model) == ("list", MINILM)
    assert [item.index for item in response.data] == [0, 1, 2]
    vectors = np.array([item.embedding for item in response.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    cat_kitten, cat_stocks = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert cat_kitten > cat_stocks + 0.3
    assert response.usage.prompt_tokens > 0


def test_the_sdks_default_base64_embeddings_equal_the_float_ones(
        client: openai.OpenAI, edge_server: Any) -> None:
    texts = ["Paris is in France.", "Berlin is in Germany."]
    floats = client.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    default = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    assert default.model == MINILM
    for plain, decoded in zip(floats.data, default.data, strict=True):
        assert np.allclose(plain.embedding, decoded.embedding, rtol=1e-6, atol=1e-7)
    raw = httpx.post(edge_server.url + "/v1/embeddings", timeout=60, json={
        "model": MINILM, "input": texts[0], "encoding_format": "base64"}).json()
    encoded = raw["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert np.allclose(np.frombuffer(base64.b64decode(encoded), "<f4"),
                       floats.data[0].embedding, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- bad input

_OK = {"model": GEMMA, "messages": CHAT, "max_tokens": 2}

BAD = {
    "invalid JSON": ("/v1/chat/completions", b'{"model": "gemma', None, "invalid_json"),
    "not UTF-8": ("/v1/completions", b'{"model": "gemma-3-270m", "prompt": "\xff\xfe"}',
                  None, "invalid_encoding"),
    "not an object": ("/v1/chat/completions", [_OK], None, "invalid_json"),
    "empty body": ("/v1/embeddings", b"", None, "invalid_json"),
    "wrong type": ("/v1/chat/completions", {**_OK, "temperature": "hot"}, "temperature",
                   None),
    "empty messages": ("/v1/chat/completions", {**_OK, "messages": []}, "messages", None),
    "negative max_tokens": ("/v1/chat/completions", {**_OK, "max_tokens": -5}, "max_tokens",
                            None),
    "n=2": ("/v1/chat/completions", {**_OK, "n": 2}, "n", None),
    "stream not a boolean": ("/v1/completions", {"model": GEMMA, "prompt": "x",
                                                 "stream": "yes"}, "stream", None),
    "missing model": ("/v1/chat/completions", {"messages": CHAT}, "model", None),
    "empty input": ("/v1/embeddings", {"model": MINILM, "input": []}, "input", None),
    "unknown field": ("/v1/completions", {"model": GEMMA, "prompt": "x", "temprature": 1},
                      "temprature", "unknown_field"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_envelope_and_the_server_keeps_serving(edge_server: Any,
                                                                   case: str) -> None:
    path, body, param, code = BAD[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(edge_server.url + path, content=content, timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert httpx.get(edge_server.url + "/v1/models", timeout=60).status_code == 200


def test_the_sdk_raises_a_bad_request_error_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=GEMMA, messages=CHAT, n=2)
    assert (caught.value.status_code, caught.value.param) == (400, "n")


def test_an_oversized_body_is_413_and_the_server_keeps_serving(
        tight_server: ServerThread) -> None:
    body = {"model": GEMMA, "prompt": "x" * 2048, "max_tokens": 1}
    response = httpx.post(tight_server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    small = httpx.post(tight_server.url + "/v1/completions", timeout=60, json={
        "model": GEMMA, "prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert small.status_code == 200


# --------------------------------------------------------------------------- streams over time


def decoded_tokens(server: Any) -> int:
    async def read() -> int:
        return int(server.service("models").residents[GEMMA].current.model.decoded_tokens)
    return server.run(read())


def test_a_client_that_disconnects_mid_stream_stops_the_generation(
        client: openai.OpenAI, edge_server: Any) -> None:
    client.completions.create(model=GEMMA, prompt=PROMPT, max_tokens=1)  # loaded
    before = decoded_tokens(edge_server)
    body = {"model": GEMMA, "prompt": "Once upon a time", "max_tokens": 2000,
            "logit_bias": NO_END, "stream": True}
    with httpx.stream("POST", edge_server.url + "/v1/completions", json=body,
                      timeout=60) as response:
        read = 0
        for line in response.iter_lines():
            read += line.startswith("data: ")
            if read == 5:
                break
    started = time.perf_counter()
    follow = client.completions.create(model=GEMMA, prompt=PROMPT, max_tokens=4,
                                       temperature=0)
    waited = time.perf_counter() - started
    stream_tokens = decoded_tokens(edge_server) - before - follow.usage.completion_tokens - 1
    assert stream_tokens < 150, "the generation went on after its client left"
    assert waited < 20, f"the next request waited {waited:.1f} s for the model"


def test_a_stream_waiting_for_the_model_is_kept_alive_with_comment_lines(
        tight_server: ServerThread) -> None:
    url = tight_server.url + "/v1/completions"
    long = {"model": GEMMA, "prompt": "Once upon a time", "max_tokens": 2000,
            "logit_bias": NO_END, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=long) as busy:
        started = busy.iter_lines()  # kept: a dropped iterator would close the stream
        next(started)  # the model is generating for the first stream now
        with httpx.Client(timeout=60) as other, other.stream(
                "POST", url, json={**long, "max_tokens": 3}) as waiting:
            lines = waiting.iter_lines()
            assert next(lines) == ": keep-alive"
            busy.close()  # frees the model: the waiting stream gets its turn
            payloads = [line[6:] for line in lines if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    assert "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1])

