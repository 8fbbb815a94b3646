"""Malformed and hostile input over HTTP: each a 4xx in the client's envelope, never a 500,
and the server keeps serving."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from inferno.kernel import Credentials


async def post(url: str, data: bytes | str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=data, headers={"Content-Type": "application/json"}) as response:
        return response.status, await response.json(content_type=None)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat", "/v1/embeddings"])
async def test_deeply_nested_json_is_a_400(edge_server: Any, path: str) -> None:
    status, body = await post(edge_server.url + path, "[" * 100000 + "]" * 100000)
    assert status == 400
    message = body["error"] if path == "/api/chat" else body["error"]["message"]
    assert "too deeply" in message


@pytest.mark.parametrize("message", [
    {"role": ["user"], "content": "hi"},
    {"role": {"a": 1}, "content": "hi"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": [1], "type": "function", "function": {"name": "f"}}]},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f",
                                                                 "arguments": 5}}]},
])
async def test_odd_message_shapes_are_client_mistakes(edge_server: Any,
                                                      message: dict[str, Any]) -> None:
    body = {"model": "gemma-3-270m", "max_tokens": 2, "messages": [message]}
    for path in ("/v1/chat/completions", "/api/chat"):
        status, answer = await post(edge_server.url + path, json.dumps(body))
        assert status == 400, (path, answer)
    status, _ = await post(edge_server.url + "/v1/completions",
                           '{"model": "gemma-3-270m", "prompt": "ok", "max_tokens": 1}')
    assert status == 200  # and it keeps serving


async def test_ollama_routes_answer_errors_in_ollama_s_shape(edge_server: Any) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(edge_server.url + "/api/nothing") as response:
            assert response.status == 404
            body = await response.json()
        assert isinstance(body["error"], str)
        async with session.get(edge_server.url + "/api/v1/nothing") as response:
            assert (await response.json())["error"]["code"] == "unknown_route"


def test_credentials_never_show_their_headers() -> None:
    shown = repr(Credentials(headers={"authorization": "Bearer sk-secret"}, peer="10.0.0.1"))
    assert "sk-secret" not in shown
    assert "10.0.0.1" in shown
