"""The ``redis`` tier shared through a real ``redis-server``: two servers (as two Inferno
processes) where an answer one computed is a hit in the other, and a Redis that is down
makes calls misses, never failures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.servers import ServerThread
from tests.test_rate_limits_redis import free_port, redis_url  # noqa: F401 - a fixture

EMBED = {"model": "minilm", "input": "shared between processes"}


async def post(url: str, body: Any) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json(), response.headers["X-Inferno-Cache"]


def redis_server(tmp: Path, url: str) -> ServerThread:
    return ServerThread("edge", tmp, sets=[f'cache.redis.url="{url}"',
                                           'cache.redis.key_prefix="test:cache:"'])


@pytest.fixture
def two_servers(tmp_path: Path, redis_url: str  # noqa: F811 - the fixture
                ) -> Iterator[tuple[ServerThread, ServerThread]]:
    with redis_server(tmp_path / "a", redis_url) as first, \
            redis_server(tmp_path / "b", redis_url) as second:
        yield first, second


def test_an_answer_one_server_stored_is_a_hit_in_the_other(two_servers):
    first, second = two_servers
    made = first.run(post(first.url + "/v1/embeddings", EMBED))
    first.run(first.service("cache").settled())
    served = second.run(post(second.url + "/v1/embeddings", EMBED))
    assert (made[0], made[2], served[0], served[2]) == (200, "miss", 200, "hit")
    assert served[1]["data"] == made[1]["data"]


def test_the_shared_tier_counts_and_clears_one_models_entries(two_servers):
    first, second = two_servers
    for text in ("one", "two"):
        first.run(post(first.url + "/v1/embeddings", {**EMBED, "input": text}))
    first.run(first.service("cache").settled())
    stats = second.run(second.service("cache").fresh_stats())["redis"]
    assert stats["entries"] == 2
    assert stats["bytes"] > 0
    removed = second.run(second.service("cache").clear(model="minilm"))
    assert removed == {"redis": 2}
    again = first.run(post(first.url + "/v1/embeddings", {**EMBED, "input": "one"}))
    assert again[2] == "miss"


def test_a_redis_that_is_down_makes_misses_not_failures(tmp_path):
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with redis_server(tmp_path, nowhere) as alone:
        answers = []
        for _ in range(2):
            answers.append(alone.run(post(alone.url + "/v1/embeddings", EMBED)))
            alone.run(alone.service("cache").settled())  # the write tried and failed
    assert [(status, told) for status, _, told in answers] == [(200, "miss"), (200, "miss")]
    assert json.dumps(answers[0][1]["data"]) == json.dumps(answers[1][1]["data"])
