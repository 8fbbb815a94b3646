"""The Ollama-compatible routes, driven by the official ``ollama`` Python client (and raw
HTTP where the client hides the wire) against a real server with Gemma 3 270M and MiniLM."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import ollama
import pytest
import structlog

from inferno.plugins.gateway.calls import Delta, Final, ToolCall
from inferno.plugins.gateway.errors import ApiError
from inferno.plugins.protocols import ollama_bodies
from inferno.plugins.protocols.ollama_api import OllamaApi, _add_tool_calls
from inferno.plugins.protocols.web import Server

GEMMA = "gemma-3-270m"
MINILM = "minilm"
PROMPT = "The capital of France is"
#: Greedy and short: the answers run to num_predict (done_reason "length").
GREEDY = {"temperature": 0, "seed": 7, "num_predict": 6}


@pytest.fixture(scope="module")
def client(edge_server: Any) -> Iterator[ollama.Client]:
    with ollama.Client(host=edge_server.url, timeout=300) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def raw(edge_server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edge_server.url, timeout=300) as http:
        yield http


def decoded_tokens(server: Any) -> int:
    """Tokens Gemma's backend has decoded over its life (it counts each one it samples)."""
    async def read() -> int:
        return int(server.kernel.service("models").residents[GEMMA].current.model
                   .decoded_tokens)
    return server.run(read())


def count_tokens(server: Any, text: str) -> int:
    async def count() -> int:
        return int(server.kernel.service("models").residents[GEMMA].current.model
                   .count_tokens(text))
    return server.run(count())


def assert_consistent_durations(final: Any, wall_ns: int) -> None:
    assert final.done is True
    assert final.prompt_eval_count > 0
    assert final.eval_count > 0
    assert final.prompt_eval_duration > 0
    assert final.eval_duration > 0
    assert final.load_duration >= 0
    parts = final.load_duration + final.prompt_eval_duration + final.eval_duration
    assert parts <= final.total_duration <= wall_ns
    assert datetime.fromisoformat(final.created_at) <= datetime.now(UTC)


# --------------------------------------------------------------------------- models


def test_version_answers_with_inferno_s_version(raw: httpx.Client) -> None:
    import importlib.metadata

    reply = raw.get("/api/version")
    assert reply.status_code == 200
    assert reply.json() == {"version": importlib.metadata.version("inferno")}


def test_the_list_shows_both_models_with_their_files_facts(client: ollama.Client) -> None:
    models = {model.model: model for model in client.list().models}
    assert set(models) == {GEMMA, MINILM}
    gemma = models[GEMMA]
    assert gemma.size > 200_000_000
    assert len(gemma.digest) == 64
    assert gemma.modified_at is not None
    assert gemma.modified_at.tzinfo is not None
    assert gemma.details.format == "gguf"
    assert gemma.details.family == "gemma3"
    assert gemma.details.parameter_size == "268.10M"
    assert gemma.details.quantization_level == "Q4_K_M"
    assert models[MINILM].details.format == "onnx"


def test_show_describes_a_language_model_and_an_embedding_model(client: ollama.Client) -> None:
    gemma = client.show(GEMMA)
    assert gemma.modelinfo["general.architecture"] == "gemma3"
    assert gemma.modelinfo["general.parameter_count"] == 268_098_176
    assert gemma.modelinfo["gemma3.context_length"] == 32768
    assert gemma.capabilities == ["completion", "tools"]
    assert gemma.details.quantization_level == "Q4_K_M"
    assert client.show(MINILM).capabilities == ["embedding"]


def test_a_name_with_ollama_s_latest_tag_finds_the_model(client: ollama.Client) -> None:
    assert client.show(GEMMA + ":latest").details.family == "gemma3"


def test_ps_lists_gemma_after_a_request_loaded_it(client: ollama.Client) -> None:
    client.generate(GEMMA, PROMPT, options={"num_predict": 1}, keep_alive="10m")
    loaded = {model.model: model for model in client.ps().models}
    gemma = loaded[GEMMA]
    assert gemma.size > 100_000_000
    assert gemma.size_vram == 0
    assert gemma.context_length > 0
    assert gemma.details.family == "gemma3"
    left = (gemma.expires_at - datetime.now(UTC)).total_seconds()
    assert 9 * 60 < left <= 10 * 60  # the request's keep_alive, not the default


# --------------------------------------------------------------------------- generate


def test_generate_counts_every_token_and_times_each_phase(
        client: ollama.Client, edge_server: Any) -> None:
    client.generate(GEMMA, PROMPT, options={"num_predict": 1})  # loaded
    before = decoded_tokens(edge_server)
    started = time.perf_counter_ns()
    answer = client.generate(GEMMA, PROMPT, raw=True, options=GREEDY)
    wall = time.perf_counter_ns() - started
    assert answer.done_reason == "length"
    assert answer.response
    assert answer.eval_count == GREEDY["num_predict"] == decoded_tokens(edge_server) - before
    assert answer.prompt_eval_count == count_tokens(edge_server, PROMPT)
    assert_consistent_durations(answer, wall)


def test_generate_streams_ndjson_pieces_then_a_final_object(
        client: ollama.Client, edge_server: Any) -> None:
    before = decoded_tokens(edge_server)
    started = time.perf_counter_ns()
    parts = list(client.generate(GEMMA, PROMPT, stream=True, options=GREEDY))
    wall = time.perf_counter_ns() - started
    *pieces, final = parts
    assert pieces
    assert all(not p.done and p.response for p in pieces)
    assert final.response == ""
    assert final.done_reason == "length"
    assert final.eval_count == GREEDY["num_predict"] == decoded_tokens(edge_server) - before
    assert len(pieces) <= final.eval_count
    assert_consistent_durations(final, wall)


def test_generate_without_raw_goes_through_the_chat_template(
        client: ollama.Client, edge_server: Any) -> None:
    templated = client.generate(GEMMA, PROMPT, system="Answer briefly.", options=GREEDY)
    bare = count_tokens(edge_server, PROMPT)
    assert templated.prompt_eval_count > bare + count_tokens(edge_server, "Answer briefly.")


def test_stream_is_the_default_and_is_ndjson(raw: httpx.Client) -> None:
    reply = raw.post("/api/generate", json={"model": GEMMA, "prompt": PROMPT,
                                            "options": {"num_predict": 3, "temperature": 0}})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert len(lines) >= 2
    assert lines[-1]["done"] is True
    assert lines[-1]["eval_count"] == 3
    assert all(line["done"] is False for line in lines[:-1])


def test_json_format_constrains_the_answer_to_json(client: ollama.Client) -> None:
    answer = client.generate(GEMMA, "A JSON object:", format={
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        options={"num_predict": 24, "temperature": 0})
    if answer.done_reason == "stop":
        assert isinstance(json.loads(answer.response)["n"], int)
    else:
        assert answer.response.lstrip().startswith("{")


# --------------------------------------------------------------------------- chat


def test_chat_answers_with_an_assistant_message(client: ollama.Client) -> None:
    started = time.perf_counter_ns()
    answer = client.chat(GEMMA, [{"role": "user", "content": "Tell me about Paris."}],
                         options=GREEDY)
    assert answer.message.role == "assistant"
    assert answer.message.content
    assert answer.eval_count == GREEDY["num_predict"]
    assert_consistent_durations(answer, time.perf_counter_ns() - started)


def test_chat_streams_message_pieces_then_the_counts(client: ollama.Client) -> None:
    parts = list(client.chat(GEMMA, [{"role": "user", "content": "Tell me about Paris."}],
                             stream=True, options=GREEDY))
    *pieces, final = parts
    assert pieces
    assert all(p.message.role == "assistant" and p.message.content for p in pieces)
    assert final.done
    assert final.message.content == ""
    assert final.eval_count == GREEDY["num_predict"]
    assert final.prompt_eval_count > 5


def test_a_tool_call_is_returned_with_its_arguments_as_an_object() -> None:
    final = Final("tool_calls", {}, (
        ToolCall("call_1", "get_weather", '{"city": "Paris"}'),))
    chunk: dict[str, Any] = {"message": {"role": "assistant", "content": ""}}
    _add_tool_calls(chunk, final)
    message = ollama.Message(**chunk["message"])
    assert message.tool_calls[0].function.name == "get_weather"
    assert message.tool_calls[0].function.arguments == {"city": "Paris"}


def test_an_earlier_tool_call_and_its_result_become_the_gateway_s_messages(
        edge_server: Any) -> None:
    models = edge_server.kernel.service("models")
    _, call = ollama_bodies.chat_call(models, {"model": GEMMA, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]})
    asked, result = call["messages"][1]["tool_calls"][0], call["messages"][2]
    assert json.loads(asked["function"]["arguments"]) == {"city": "Paris"}
    assert result["tool_call_id"] == asked["id"]
    assert result["name"] == "get_weather"


# --------------------------------------------------------------------------- embeddings


def test_embed_returns_a_unit_vector_of_384_floats_per_input(client: ollama.Client) -> None:
    reply = client.embed(MINILM, ["The cat sat on the mat.", "Stock markets fell today."])
    assert len(reply.embeddings) == 2
    assert all(len(v) == 384 for v in reply.embeddings)
    for vector in reply.embeddings:
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-3)
    assert reply.embeddings[0] != reply.embeddings[1]
    assert reply.prompt_eval_count > 8
    assert reply.total_duration > 0


def test_the_older_embeddings_route_gives_the_same_vector(client: ollama.Client) -> None:
    text = "The cat sat on the mat."
    single = client.embeddings(MINILM, text).embedding
    batch = client.embed(MINILM, text).embeddings[0]
    assert len(single) == 384
    assert math.isclose(sum(a * b for a, b in zip(single, batch, strict=True)), 1.0,
                        rel_tol=1e-4)


# --------------------------------------------------------------------------- errors


def test_an_unknown_model_is_a_404_the_client_raises(client: ollama.Client) -> None:
    for attempt in (lambda: client.generate("no-such-model", PROMPT),
                    lambda: list(client.chat("no-such-model", [{"role": "user", "content": "hi"}],
                                             stream=True)),
                    lambda: client.embed("no-such-model", "hi"),
                    lambda: client.show("no-such-model")):
        with pytest.raises(ollama.ResponseError) as caught:
            attempt()
        assert caught.value.status_code == 404
        assert "no-such-model" in caught.value.error


def test_errors_are_ollama_s_error_object_not_the_openai_envelope(raw: httpx.Client) -> None:
    reply = raw.post("/api/chat", json={"model": "no-such-model", "messages": []})
    assert reply.status_code == 404
    assert isinstance(reply.json()["error"], str)


def test_a_prompt_too_long_for_the_context_keeps_its_status_on_a_stream(
        client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.generate(GEMMA, "Paris " * 5000, raw=True, stream=True,
                             options={"num_predict": 2}))
    assert caught.value.status_code == 400
    assert "context" in caught.value.error


def test_an_error_after_the_stream_opened_is_a_last_error_line(edge_server: Any) -> None:
    async def failing() -> AsyncIterator[Delta | Final]:
        yield Delta("Paris", 1)
        raise ApiError(503, "the model was unloaded")

    async def frames() -> list[Any]:
        api = OllamaApi(Server(gateway=None, config={}, log=structlog.get_logger(),
                               kernel=None))
        framing = api._frames({"model": GEMMA}, lambda text: {"response": text}, 0.0)
        return [json.loads(line) async for line in framing(failing())]

    first, last = edge_server.run(frames())
    assert first["response"] == "Paris"
    assert first["done"] is False
    assert last == {"error": "the model was unloaded"}


@pytest.mark.parametrize(("options", "named"), [
    ({"temperature": "hot"}, "temperature"),
    ({"num_predict": 0}, "num_predict"),
    ({"tempreature": 0.5}, "tempreature"),
    ({"mirostat": 2}, "mirostat"),
])
def test_a_bad_option_is_a_400_that_names_it(client: ollama.Client, options: dict[str, Any],
                                             named: str) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(GEMMA, PROMPT, options=options)
    assert caught.value.status_code == 400
    assert named in caught.value.error


@pytest.mark.parametrize("fields", [{"think": True}, {"suffix": " end."},
                                    {"context": [1, 2, 3]}, {"images": ["aGk="]},
                                    {"keep_alive": "soon"}, {"format": "yaml"}])
def test_fields_inferno_cannot_honour_are_refused(raw: httpx.Client,
                                                  fields: dict[str, Any]) -> None:
    reply = raw.post("/api/generate", json={"model": GEMMA, "prompt": PROMPT, **fields})
    assert reply.status_code == 400, reply.text
    assert next(iter(fields)) in reply.json()["error"]


def test_load_options_set_per_model_in_inferno_are_ignored(client: ollama.Client) -> None:
    answer = client.generate(GEMMA, PROMPT, raw=True,
                             options={"num_ctx": 8192, "num_thread": 1, "num_predict": 2,
                                      "temperature": 0})
    assert answer.eval_count == 2


def test_the_server_keeps_serving_after_bad_requests(client: ollama.Client,
                                                     raw: httpx.Client) -> None:
    assert raw.post("/api/generate", content=b"{not json").status_code == 400
    with pytest.raises(ollama.ResponseError):
        client.generate(GEMMA, PROMPT, options={"top_k": "many"})
    assert client.generate(GEMMA, PROMPT, options=GREEDY).eval_count == GREEDY["num_predict"]
    assert {m.model for m in client.list().models} == {GEMMA, MINILM}


def test_model_management_routes_say_inferno_does_not_offer_them(raw: httpx.Client) -> None:
    reply = raw.post("/api/pull", json={"model": "llama3"})
    assert reply.status_code == 501
    assert "plugins.models.entries" in reply.json()["error"]


# --------------------------------------------------------------------------- load, unload


def test_a_request_without_prompt_loads_and_keep_alive_0_unloads(client: ollama.Client) -> None:
    assert client.generate(GEMMA, keep_alive=0).done_reason == "unload"
    assert GEMMA not in {m.model for m in client.ps().models}
    assert client.chat(GEMMA, []).done_reason == "load"
    assert GEMMA in {m.model for m in client.ps().models}


# --------------------------------------------------------------------------- translation


@pytest.mark.parametrize(("given", "seconds"), [
    (300, 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("250ms", 0.25),
    ("0", 0.0), (-1, -1.0), ("-1m", -1.0)])
def test_keep_alive_reads_seconds_and_go_durations(given: Any, seconds: float) -> None:
    assert ollama_bodies.keep_alive(given) == seconds


def test_options_become_the_gateway_s_sampling_fields() -> None:
    assert ollama_bodies.options({
        "temperature": 0.2, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 1,
        "num_predict": 16, "stop": ["\n"], "repeat_penalty": 1.1, "presence_penalty": 0.5,
        "frequency_penalty": 0.3, "num_ctx": 4096, "typical_p": 1.0}) == {
        "temperature": 0.2, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 1,
        "max_tokens": 16, "stop": ["\n"], "repeat_penalty": 1.1, "presence_penalty": 0.5,
        "frequency_penalty": 0.3}
    assert ollama_bodies.options({"num_predict": -1}) == {}


def test_an_unknown_top_level_field_is_refused() -> None:
    with pytest.raises(ApiError) as caught:
        ollama_bodies.checked({"model": GEMMA, "promt": "x"}, ollama_bodies.GENERATE_FIELDS)
    assert caught.value.status == 400
    assert "promt" in caught.value.message
