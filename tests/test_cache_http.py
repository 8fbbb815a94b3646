"""The response cache in a running server: what HTTP, WebSocket and stdin clients are
told, a replayed stream, twenty identical requests at once, the admin routes and the
``inferno cache`` commands."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import INFERNO, run_inferno
from tests.model_files import write_tiny_gguf
from tests.servers import ServerThread

EMBED = {"model": "minilm", "input": "a sentence worth keeping"}
#: A deterministic chat on the tiny model: its end-of-sequence token (</s>, id 2) is banned.
CHAT = {"model": "tiny", "temperature": 0, "max_tokens": 12, "logit_bias": {"2": -100},
        "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context_length=512)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Iterator[ServerThread]:
    """Edge with a memory and a disk tier, WebSocket on the HTTP port, and a tiny model."""
    with ServerThread("edge", tmp_path_factory.mktemp("data"), sets=[
            f'plugins.models.entries.tiny.path="{tiny}"', "cache.memory.max_entries=1000",
            "cache.disk.zstd_level=3", "protocols.websocket.port=0"]) as started:
        yield started


async def post(url: str, body: Any, headers: dict[str, str] | None = None
               ) -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as session, \
            session.post(url, json=body, headers=headers) as response:
        return response.status, await response.read(), response.headers


def data_of(raw: bytes) -> Any:
    return json.loads(raw)["data"]


async def test_a_second_identical_embeddings_request_is_a_hit_with_the_same_data(server):
    url = server.url + "/v1/embeddings"
    first = await post(url, {**EMBED, "input": "asked twice"})
    second = await post(url, {**EMBED, "input": "asked twice"})
    assert (first[0], second[0]) == (200, 200)
    assert (first[2]["X-Inferno-Cache"], second[2]["X-Inferno-Cache"]) == ("miss", "hit")
    assert data_of(second[1]) == data_of(first[1])


async def test_cache_control_no_store_bypasses_the_cache(server):
    url = server.url + "/v1/embeddings"
    await post(url, EMBED)
    status, _, headers = await post(url, EMBED, {"Cache-Control": "no-store"})
    assert (status, headers["X-Inferno-Cache"]) == (200, "bypass")


async def test_a_sampled_chat_is_not_cached(server):
    url = server.url + "/v1/chat/completions"
    body = {**CHAT, "temperature": 0.8}
    told = [(await post(url, body))[2]["X-Inferno-Cache"] for _ in range(2)]
    assert told == ["bypass", "bypass"]


async def stream(url: str, body: Any) -> tuple[str, list[str], Any]:
    """The cache header, the content of every SSE chunk, and the last chunk's usage."""
    async with aiohttp.ClientSession() as session, \
            session.post(url, json={**body, "stream": True,
                                    "stream_options": {"include_usage": True}}) as response:
        assert response.status == 200
        raw = (await response.read()).decode()
        told = response.headers["X-Inferno-Cache"]
    events = [json.loads(line[6:]) for line in raw.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    contents = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    return told, contents, events[-1]["usage"]


async def test_a_streamed_chat_that_hits_is_replayed_as_the_same_stream(server):
    url = server.url + "/v1/chat/completions"
    body = {**CHAT, "messages": [{"role": "user", "content": "stream this"}]}
    first, made, usage = await stream(url, body)
    second, replayed, replayed_usage = await stream(url, body)
    assert (first, second) == ("miss", "hit")
    assert replayed == made
    assert len(made) > 3
    assert replayed_usage == usage


async def test_a_plain_request_hits_what_a_stream_stored(server):
    url = server.url + "/v1/chat/completions"
    body = {**CHAT, "messages": [{"role": "user", "content": "streamed, then plain"}]}
    _, made, _ = await stream(url, body)
    status, raw, headers = await post(url, body)
    assert (status, headers["X-Inferno-Cache"]) == (200, "hit")
    assert json.loads(raw)["choices"][0]["message"]["content"] == "".join(made)


async def model_runs(server: ServerThread) -> float:
    """``inferno_model_runs_total`` of the tiny model's chats, as /metrics says."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, \
            session.get(server.url + "/metrics") as response:
        text = await response.text()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "inferno_model_runs_total"
               and sample.labels == {"model": "tiny", "operation": "chat"})


async def test_twenty_identical_requests_at_once_run_the_model_once(server):
    cache = server.service("cache")
    before = dict(cache.outcomes)
    runs_before = await model_runs(server)
    url = server.url + "/v1/chat/completions"
    body = {**CHAT, "messages": [{"role": "user", "content": "twenty at once"}]}
    answers = await asyncio.gather(*(post(url, body) for _ in range(20)))
    told = sorted(headers["X-Inferno-Cache"] for _, _, headers in answers)
    assert told == ["hit"] * 19 + ["miss"]
    texts = {json.loads(raw)["choices"][0]["message"]["content"] for _, raw, _ in answers}
    assert len(texts) == 1
    assert cache.outcomes["miss"] - before["miss"] == 1
    assert await model_runs(server) - runs_before == 1  # counted through the metrics too


async def test_websocket_results_say_whether_they_were_cached(server):
    endpoint = str(server.kernel.drivers("protocols")["websocket"].endpoint)
    told = []
    async with aiohttp.ClientSession() as session, session.ws_connect(endpoint) as socket:
        for ident in ("first", "second"):
            await socket.send_str(json.dumps({"type": "embeddings", "id": ident,
                                              **{**EMBED, "input": "over a socket"}}))
            frame = await socket.receive_json(timeout=60)
            told.append((frame["type"], frame["cache"]))
    assert told == [("done", "miss"), ("done", "hit")]


def test_stdin_results_say_whether_they_were_cached(tmp_path):
    lines = "".join(json.dumps({"id": n, **EMBED}) + "\n" for n in (1, 2))
    done = subprocess.run(
        [str(INFERNO), "--profile", "edge", "--protocol", "stdin", "--set",
         "cache.memory.max_entries=10", "--set", "protocols.stdin.max_concurrent=1"],
        input=lines.encode(), capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    results = {row["id"]: row for row in map(json.loads, done.stdout.decode().splitlines())}
    assert (results[1]["cache"], results[2]["cache"]) == ("miss", "hit")


# --------------------------------------------------------------------------- administration


async def get_json(method: str, url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url) as response:
        return response.status, await response.json()


async def test_the_stats_route_shows_each_tier_in_lookup_order(server):
    await post(server.url + "/v1/embeddings", {**EMBED, "input": "counted"})
    status, body = await get_json("GET", server.url + "/api/v1/cache")
    assert status == 200
    assert list(body["tiers"]) == ["memory", "disk"]
    assert set(body["tiers"]["memory"]) == {"hits", "misses", "evictions", "bytes", "entries"}
    assert body["tiers"]["memory"]["entries"] > 0
    assert body["calls"]["miss"] > 0


async def test_clearing_a_model_by_route_makes_its_next_request_a_miss(server):
    url = server.url + "/v1/embeddings"
    await post(url, {**EMBED, "input": "cleared"})  # its write may still be on its way:
    status, body = await get_json("DELETE", server.url + "/api/v1/cache?model=all-minilm-l6-v2")
    assert (status, body["model"]) == (200, "minilm")
    assert body["removed"]["memory"] > 0
    _, _, headers = await post(url, {**EMBED, "input": "cleared"})
    assert headers["X-Inferno-Cache"] == "miss"


async def test_an_unknown_tier_is_a_404(server):
    status, body = await get_json("DELETE", server.url + "/api/v1/cache?tier=nowhere")
    assert (status, body["error"]["code"]) == (404, "unknown_tier")


def test_the_admin_routes_need_cache_manage(tmp_path):
    with ServerThread("edge", tmp_path / "data", sets=['auth.none.roles=["user"]',
                                                       "cache.memory.max_entries=10"]) as viewer:
        for method in ("GET", "DELETE"):
            status, body = viewer.run(get_json(method, viewer.url + "/api/v1/cache"))
            assert (status, body["error"]["code"]) == (403, "permission_denied")


def test_the_cache_commands_read_and_clear_the_disk_tier_a_server_shares(tmp_path, tiny):
    data = tmp_path / "data"  # the autouse fixture points INFERNO_KERNEL__DATA_DIR here
    tier = ["--set", "cache.disk.zstd_level=3"]
    with ServerThread("edge", data, sets=["cache.disk.zstd_level=3"]) as shared:
        for text in ("one", "two"):
            shared.run(post(shared.url + "/v1/embeddings", {**EMBED, "input": text}))
        shared.run(shared.service("cache").settled())  # answers go out before their writes
        stats = run_inferno("cache", "stats", "--json", *tier)
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["disk"]["entries"] == 2
        cleared = run_inferno("cache", "clear", "--model", "all-minilm-l6-v2", *tier)
        assert cleared.returncode == 0, cleared.stderr
        assert "disk: removed 2 entries of minilm" in cleared.stdout
        _, _, headers = shared.run(post(shared.url + "/v1/embeddings", {**EMBED,
                                                                         "input": "one"}))
        assert headers["X-Inferno-Cache"] == "miss"


async def test_a_profile_can_schedule_the_warm_up(tmp_path: Path) -> None:
    sets = ["cache.memory.max_entries=100", 'plugins.cache.warmup={minilm=[{input="warm me"}]}',
            'schedulers.apscheduler.jobs.warm={action="cache.warmup", trigger="interval", '
            "seconds=0.3}"]
    with ServerThread("edge", tmp_path / "data", sets=sets) as server:
        scheduler = server.service("scheduler")
        for _ in range(200):
            runs = sum(row.get("runs", 0) for job, row in scheduler.stats().items()
                       if "warm" in job)
            if runs >= 2:
                break
            await asyncio.sleep(0.05)
        assert runs >= 2
        _, _, headers = await post(server.url + "/v1/embeddings",
                                   {"model": "minilm", "input": "warm me"})
    assert headers["X-Inferno-Cache"] == "hit"
