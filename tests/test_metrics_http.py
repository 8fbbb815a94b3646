"""Known requests to a running server move its metrics exactly: embeddings, a completion, an
answer from the cache, a bad key, a rate limit, an unknown route; and ``/metrics`` itself is
refused to callers without ``metrics:read``, on the HTTP server or on a port of its own."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from inferno.plugins.auth.keystore import KeyStore
from tests.model_files import write_tiny_gguf
from tests.servers import ServerThread
from tests.test_metrics import CACHED, ENABLED, samples, value

Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]
#: A key in the store's format that the store never issued.
UNKNOWN_KEY = "inf_" + "0" * 12 + "_" + "1" * 64


def keys_in(folder: Path, **roles: list[str]) -> tuple[Path, dict[str, str]]:
    """A key store in ``folder`` with one key per name, of the given roles."""
    path = folder / "keys.sqlite"
    store = KeyStore(path)
    keys = {name: store.create(name, roles=granted)[1] for name, granted in roles.items()}
    store.close()
    return path, keys


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    """The edge profile with the exporter on the HTTP server, a memory cache tier, API keys
    beside anonymous callers, and anonymous callers limited to one request a minute."""
    folder = tmp_path_factory.mktemp("served")
    tiny = write_tiny_gguf(folder / "tiny.gguf", context_length=4096)
    store, keys = keys_in(folder, admin=["admin"], blind=["nometrics"])
    sets = [ENABLED, CACHED, f'plugins.models.entries.tiny.path="{tiny}"',
            f'auth.api_key.store="{store}"', "rate_limits.anonymous.requests_per_minute=1",
            'security.roles={nometrics=["infer"]}', "protocols.websocket.share_http=true"]
    with ServerThread("edge", folder / "data", sets=sets) as server:
        yield server, keys


async def request(method: str, url: str, key: str | None = None, body: Any = None
                  ) -> tuple[int, Any, Any]:
    """``(status, body, headers)``; the body as JSON when it is JSON."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session, \
            session.request(method, url, headers=headers, json=body) as response:
        text = await response.text()
        is_json = response.content_type == "application/json"
        return response.status, json.loads(text) if is_json else text, \
            response.headers


async def scrape(url: str, key: str | None) -> Scrape:
    status, text, _ = await request("GET", url + "/metrics", key)
    assert status == 200, text
    return samples(text)


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def unique(text: str) -> str:
    """Text no earlier request sent (so that the cache cannot answer it)."""
    return f"{text} {uuid.uuid4().hex}"


async def test_two_embeddings_count_two_calls_two_model_runs_and_their_tokens(
        served: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = served
    before = await scrape(server.url, keys["admin"])
    tokens = 0
    for _ in range(2):
        status, body, _ = await request("POST", server.url + "/v1/embeddings", keys["admin"],
                                        {"model": "minilm", "input": unique("hello")})
        assert status == 200
        tokens += body["usage"]["prompt_tokens"]
    after = await scrape(server.url, keys["admin"])
    assert moved(before, after, "inferno_requests_total", operation="embeddings",
                 model="minilm", protocol="http", outcome="ok") == 2
    assert moved(before, after, "inferno_model_runs_total", model="minilm",
                 operation="embeddings") == 2
    assert tokens > 0
    assert moved(before, after, "inferno_prompt_tokens_total", model="minilm") == tokens
    assert moved(before, after, "inferno_http_requests_total", route="/v1/embeddings",
                 method="POST", status="200") == 2
    assert moved(before, after, "inferno_request_duration_seconds_count",
                 operation="embeddings", model="minilm") == 2
    assert moved(before, after, "inferno_http_request_duration_seconds_count",
                 route="/v1/embeddings", method="POST") == 2
    assert moved(before, after, "inferno_queue_wait_seconds_count", model="minilm") == 2


async def test_an_answer_from_the_cache_is_a_call_but_no_model_run(
        served: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = served
    body = {"model": "minilm", "input": unique("twice")}
    before = await scrape(server.url, keys["admin"])
    answers = [await request("POST", server.url + "/v1/embeddings", keys["admin"], body)
               for _ in range(2)]
    after = await scrape(server.url, keys["admin"])
    assert [status for status, _, _ in answers] == [200, 200]
    assert answers[1][2].get("X-Inferno-Cache") == "hit"
    assert moved(before, after, "inferno_requests_total", operation="embeddings",
                 model="minilm", protocol="http", outcome="ok") == 2
    assert moved(before, after, "inferno_model_runs_total", model="minilm",
                 operation="embeddings") == 1
    assert moved(before, after, "inferno_prompt_tokens_total", model="minilm") == \
        answers[0][1]["usage"]["prompt_tokens"]
    assert moved(before, after, "inferno_cache_hits_total", tier="memory") == 1


async def test_a_completion_moves_its_tokens_and_every_generation_histogram(
        served: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = served
    status, _, _ = await request("POST", server.url + "/api/v1/models/tiny/unload",
                                 keys["admin"])
    assert status == 200
    before = await scrape(server.url, keys["admin"])
    status, body, _ = await request("POST", server.url + "/v1/completions", keys["admin"], {
        "model": "tiny", "prompt": unique("once upon"), "max_tokens": 8,
        "logit_bias": {"2": -100}})  # no end-of-sequence token: all 8 tokens come
    after = await scrape(server.url, keys["admin"])
    assert status == 200
    usage = body["usage"]
    assert usage["completion_tokens"] == 8
    assert moved(before, after, "inferno_requests_total", operation="completion",
                 model="tiny", protocol="http", outcome="ok") == 1
    assert moved(before, after, "inferno_model_runs_total", model="tiny",
                 operation="completion") == 1
    assert moved(before, after, "inferno_completion_tokens_total", model="tiny") == 8
    assert moved(before, after, "inferno_prompt_tokens_total", model="tiny") == \
        usage["prompt_tokens"]
    for histogram in ("inferno_time_to_first_token_seconds",
                      "inferno_inter_token_latency_seconds",
                      "inferno_generation_duration_seconds", "inferno_queue_wait_seconds",
                      "inferno_model_load_seconds"):
        assert moved(before, after, histogram + "_count", model="tiny") == 1, histogram
    assert value(after, "inferno_model_memory_bytes", model="tiny") > 0
    assert value(after, "inferno_models_loaded") >= 1


async def test_a_bad_key_is_counted_as_an_auth_failure_and_a_401(
        served: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = served
    before = await scrape(server.url, keys["admin"])
    status, body, _ = await request("POST", server.url + "/v1/embeddings", UNKNOWN_KEY,
                                    {"model": "minilm", "input": "hello"})
    after = await scrape(server.url, keys["admin"])
    assert status == 401
    assert body["error"]["code"] == "invalid_credentials"
    assert moved(before, after, "inferno_auth_failures_total",
                 reason="invalid_credentials") == 1
    assert moved(before, after, "inferno_requests_total", operation="access", model="",
                 protocol="http", outcome="unauthorized") == 1
    assert moved(before, after, "inferno_http_requests_total", route="/v1/embeddings",
                 method="POST", status="401") == 1
    assert moved(before, after, "inferno_requests_total", operation="embeddings",
                 model="minilm", protocol="http", outcome="ok") == 0


async def test_calls_over_the_rate_limit_are_counted_as_rejections(
        served: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = served
    before = await scrape(server.url, keys["admin"])
    statuses = [(await request("GET", server.url + "/v1/models"))[0] for _ in range(2)]
    after = await scrape(server.url, keys["admin"])
    refused = statuses.count(429)
    assert refused >= 1  # one request a minute: the second at least is refused
    assert moved(before, after, "inferno_rate_limit_rejections_total") == refused
    assert moved(before, after, "inferno_requests_total", operation="models.list", model="",
                 protocol="http", outcome="rate_limited") == refused
    assert moved(before, after, "inferno_http_requests_total", route="/v1/models",
                 method="GET", status="429") == refused


async def test_an_unknown_route_is_counted_as_unmatched(
        served: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = served
    before = await scrape(server.url, keys["admin"])
    status, _, _ = await request("GET", server.url + "/no/such/route", keys["admin"])
    after = await scrape(server.url, keys["admin"])
    assert status == 404
    assert moved(before, after, "inferno_http_requests_total", route="unmatched",
                 method="GET", status="404") == 1
    assert not [labels for _, labels in after if ("route", "/no/such/route") in labels]


async def test_metrics_is_refused_to_callers_without_metrics_read(
        served: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = served
    assert (await request("GET", server.url + "/metrics", UNKNOWN_KEY))[0] == 401
    status, body, _ = await request("GET", server.url + "/metrics", keys["blind"])
    assert status == 403
    assert body["error"]["code"] == "permission_denied"
    status, text, headers = await request("GET", server.url + "/metrics", keys["admin"])
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "inferno_build_info{" in text


async def test_a_stream_refused_before_its_first_token_counts_its_error(
        served: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = served
    before = await scrape(server.url, keys["admin"])
    status, _, _ = await request("POST", server.url + "/v1/completions", keys["admin"], {
        "model": "tiny", "prompt": "hello " * 6000, "max_tokens": 4, "stream": True})
    after = await scrape(server.url, keys["admin"])
    assert status == 400
    assert moved(before, after, "inferno_requests_total", operation="completion",
                 model="tiny", protocol="http", outcome="client_error") == 1
    assert moved(before, after, "inferno_requests_total", operation="completion",
                 model="tiny", protocol="http", outcome="ok") == 0
    assert moved(before, after, "inferno_time_to_first_token_seconds_count", model="tiny") == 0


async def test_a_completion_over_websocket_counts_under_its_protocol(
        served: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = served
    before = await scrape(server.url, keys["admin"])
    headers = {"Authorization": f"Bearer {keys['admin']}"}
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(server.url + "/v1/ws", headers=headers) as ws:
        await ws.send_json({"type": "completion", "id": "c", "model": "tiny", "max_tokens": 4,
                            "prompt": unique("over a socket"), "logit_bias": {"2": -100}})
        frame = await ws.receive_json()
        while frame["type"] not in ("done", "error"):
            frame = await ws.receive_json()
    after = await scrape(server.url, keys["admin"])
    assert frame["type"] == "done"
    assert moved(before, after, "inferno_requests_total", operation="completion",
                 model="tiny", protocol="websocket", outcome="ok") == 1
    assert moved(before, after, "inferno_completion_tokens_total", model="tiny") == \
        frame["usage"]["completion_tokens"]
    assert moved(before, after, "inferno_time_to_first_token_seconds_count", model="tiny") == 1


# --------------------------------------------------------------------------- own port


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def own_port(tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    """Keys only (no anonymous callers), the exporter on a port of its own."""
    folder = tmp_path_factory.mktemp("own-port")
    store, keys = keys_in(folder, viewer=["viewer"], admin=["admin"])
    sets = [f"exporters.prometheus.port={free_port()}", "auth.none.enabled=false",
            f'auth.api_key.store="{store}"']
    with ServerThread("edge", folder / "data", sets=sets) as server:
        yield server, keys


async def test_on_its_own_port_metrics_needs_a_key_with_metrics_read(
        own_port: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = own_port
    url = server.service("metrics").url
    assert url != server.url
    status, body, _ = await request("GET", url + "/metrics")
    assert status == 401
    assert body["error"]["code"] == "missing_credentials"
    after = await scrape(url, keys["viewer"])
    assert value(after, "inferno_auth_failures_total", reason="missing_credentials") == 1
    assert value(after, "inferno_http_requests_total", route="/metrics", method="GET",
                 status="401") == 1


async def test_on_its_own_port_metrics_is_not_on_the_http_server(
        own_port: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = own_port
    assert (await request("GET", server.url + "/metrics", keys["admin"]))[0] == 404


async def test_on_its_own_port_metrics_is_refused_to_a_name_that_rebinds_to_loopback(
        own_port: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = own_port
    url = server.service("metrics").url
    async with aiohttp.ClientSession() as session, session.get(
            url + "/metrics", headers={"Host": "attacker.example",
                                       "Authorization": f"Bearer {keys['viewer']}"}) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "origin_not_allowed"

