"""Embedding batches on the real MiniLM: one call runs as length-sorted runs under a token
budget, and concurrent HTTP requests are gathered into shared backend calls, with the same
vectors as each text embedded alone."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from inferno.kernel import ModelSpec
from inferno.plugins.backends.onnx_text import plan_runs
from inferno.plugins.gateway.calls import Call
from tests.servers import ServerThread

WORDS = ("river", "market", "the", "a", "quiet", "engine", "of", "bright", "morning", "fell",
         "rose", "under", "people", "question", "garden", "music", "slowly", "yesterday")
#: Batched against solo vectors: the largest difference measured was 6e-8 (float32 rounding
#: of sums taken in another order), so this leaves room for other CPUs and nothing more.
TOLERANCE = 1e-6


def mixed_texts(count: int, seed: int = 7) -> list[str]:
    """``count`` sentences of 1 to 60 words in no particular order of length."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
            for _ in range(count)]


@asynccontextmanager
async def minilm(make_kernel: Any, minilm_onnx: Path, minilm_files: Path,
                 **options: Any) -> AsyncIterator[Any]:
    """MiniLM loaded by a running kernel's ``onnx`` backend, its session runs recorded as the
    shapes of their ``input_ids`` in ``model.runs``."""
    kernel = make_kernel({"backends": {"onnx": {}}})
    async with kernel.running():
        backend = kernel.drivers("backends")["onnx"]
        model = await backend.load(ModelSpec("minilm", minilm_onnx, "onnx", options={
            "tokenizer": str(minilm_files / "tokenizer.json"), **options}))
        model.runs = []
        run = model.run

        def recorded(outputs: Any, feeds: Mapping[str, np.ndarray]) -> Any:
            model.runs.append(feeds["input_ids"].shape)
            return run(outputs, feeds)

        model.run = recorded
        try:
            yield model
        finally:
            await model.close()


async def alone(model: Any, texts: list[str]) -> np.ndarray:
    return np.array([(await model.embed([text]))[0] for text in texts])


# --------------------------------------------------------------------------- planning


def test_equal_widths_run_in_batches_of_the_most_texts_allowed() -> None:
    assert plan_runs([10] * 10, 4, 4096) == [range(0, 4), range(4, 8), range(8, 10)]


def test_short_texts_run_apart_from_long_ones() -> None:
    assert plan_runs([5, 5, 5, 5, 60, 60], 32, 4096) == [range(0, 4), range(4, 6)]


def test_close_widths_share_a_run_when_a_split_would_cost_more_than_its_padding() -> None:
    assert plan_runs([20, 21, 22, 23], 32, 4096) == [range(0, 4)]


def test_no_run_exceeds_the_token_budget_and_a_wider_text_runs_alone() -> None:
    runs = plan_runs([10, 10, 10, 30, 30, 100], 32, 60)
    assert runs == [range(0, 3), range(3, 5), range(5, 6)]


# --------------------------------------------------------------------------- the backend


async def test_a_call_runs_sorted_by_length_each_run_padded_to_its_own_longest(
        make_kernel, minilm_onnx, minilm_files) -> None:
    texts = mixed_texts(32)
    async with minilm(make_kernel, minilm_onnx, minilm_files) as model:
        batched = np.array(await model.embed(texts))
        runs = list(model.runs)
        solo = await alone(model, texts)
        lengths = sorted(model.count_tokens(text) for text in texts)
    assert len(runs) > 1
    assert sum(rows for rows, _ in runs) == len(texts)
    widths = [width for _, width in runs]
    assert widths == sorted(widths)
    start = 0
    for rows, width in runs:  # each run holds the next shortest texts, padded to its longest
        assert width == lengths[start + rows - 1]
        start += rows
    assert sum(rows * width for rows, width in runs) < len(texts) * lengths[-1]
    assert np.allclose(batched, solo, rtol=0, atol=TOLERANCE)  # in the order given


async def test_a_call_larger_than_a_batch_keeps_the_callers_order(
        make_kernel, minilm_onnx, minilm_files) -> None:
    texts = mixed_texts(40, seed=3)
    async with minilm(make_kernel, minilm_onnx, minilm_files, batch_size=8) as model:
        batched = np.array(await model.embed(texts))
        runs = list(model.runs)
        solo = await alone(model, texts)
    assert max(rows for rows, _ in runs) <= 8
    assert np.allclose(batched, solo, rtol=0, atol=TOLERANCE)


async def test_every_run_keeps_within_the_token_budget(
        make_kernel, minilm_onnx, minilm_files) -> None:
    texts = [*mixed_texts(20, seed=5), "word " * 300]  # the last one is cut to 256 tokens
    async with minilm(make_kernel, minilm_onnx, minilm_files, max_batch_tokens=128) as model:
        batched = np.array(await model.embed(texts))
        runs = list(model.runs)
        info = dict(model.info)
        solo = await alone(model, texts)
    assert info["max_batch_tokens"] == 128
    assert all(rows * width <= 128 for rows, width in runs if rows > 1)
    assert (1, 256) in runs  # wider than the budget: alone
    assert np.allclose(batched, solo, rtol=0, atol=TOLERANCE)


def test_a_bad_token_budget_is_named(make_kernel, run_kernel, minilm_onnx) -> None:
    from inferno.plugins.models.errors import ModelError

    async def load(kernel: Any) -> Any:
        return await kernel.drivers("backends")["onnx"].load(ModelSpec(
            "minilm", minilm_onnx, "onnx", options={"max_batch_tokens": 0}))

    with pytest.raises(ModelError, match="option max_batch_tokens must be a whole number, 1 "
                                         "or more, got 0"):
        run_kernel(make_kernel({"backends": {"onnx": {}}}), load)


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The edge profile with its default gathering window."""
    with ServerThread("edge", tmp_path_factory.mktemp("batching"),
                      ["protocols.http.access_log=false"]) as server:
        yield server


async def post(session: aiohttp.ClientSession, url: str, text: str
               ) -> tuple[int, dict[str, Any]]:
    async with session.post(url + "/v1/embeddings",
                            json={"model": "minilm", "input": text}) as response:
        return response.status, await response.json()


async def queue(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The model's queue as ``/api/v1/status`` shows it."""
    async with session.get(url + "/api/v1/status") as response:
        return (await response.json())["queues"].get("minilm", {})  # type: ignore[no-any-return]


async def served(session: aiohttp.ClientSession, url: str) -> int:
    """Backend calls the model's queue has served: a gathered batch counts once."""
    return int((await queue(session, url)).get("served", 0))


async def concurrent_clients(url: str, texts: list[str]) -> tuple[list[Any], int]:
    """Each text alone, one after another, then all at once from as many clients: the
    vectors of both, and how many backend calls served the concurrent ones."""
    connector = aiohttp.TCPConnector(limit=len(texts))
    async with aiohttp.ClientSession(connector=connector) as session:
        solo = [await post(session, url, text) for text in texts]
        before = await served(session, url)
        together = await asyncio.gather(*(post(session, url, text) for text in texts))
        calls = await served(session, url) - before
    for (status, one), (other, batched) in zip(solo, together, strict=True):
        assert (status, other) == (200, 200)
        assert batched["usage"] == one["usage"]
        assert np.allclose(batched["data"][0]["embedding"], one["data"][0]["embedding"],
                           rtol=0, atol=TOLERANCE)
    return together, calls


async def test_32_concurrent_clients_share_fewer_backend_calls(server) -> None:
    together, calls = await concurrent_clients(server.url, mixed_texts(32, seed=11))
    assert len(together) == 32
    assert 1 <= calls < 32


async def test_a_bad_input_fails_only_its_own_request_in_a_batch(server) -> None:
    texts = mixed_texts(8, seed=13)
    async with aiohttp.ClientSession() as session:
        solo = [await post(session, server.url, text) for text in texts]
        before = await served(session, server.url)
        answers = await asyncio.gather(*(post(session, server.url, text) for text in
                                          [*texts[:4], "a lone \ud800 surrogate", *texts[4:]]))
        calls = await served(session, server.url) - before
    status, refused = answers.pop(4)
    assert status == 400
    assert refused["error"]["message"] == ("minilm: input 0 is not valid Unicode: character 7 "
                                           "is a lone surrogate (U+D800)")
    assert [status for status, _ in answers] == [200] * 8
    for (_, one), (_, batched) in zip(solo, answers, strict=True):
        assert np.allclose(batched["data"][0]["embedding"], one["data"][0]["embedding"],
                           rtol=0, atol=TOLERANCE)
    assert calls < 9  # they were gathered, and the batch's failure was not theirs


def test_without_a_window_requests_that_wait_are_still_gathered(tmp_path) -> None:
    with ServerThread("edge", tmp_path, ["protocols.http.access_log=false",
                                         "plugins.gateway.embedding_batch_window=0"]) as server:
        assert server.service("gateway").batcher.window == 0
        together, calls = asyncio.run(concurrent_clients(server.url, mixed_texts(32, seed=17)))
    assert len(together) == 32
    assert 1 <= calls < 32


# --------------------------------------------------------------------------- the window


def gathering_kernel(make_kernel: Any) -> Any:
    """The edge profile with a window long enough that waiting it out would show."""
    return make_kernel(None, base="edge", sets=[
        "plugins.models.watch_interval=0", "plugins.gateway.embedding_batch_window=1",
        "plugins.gateway.embedding_batch=3"])


async def embed(gateway: Any, text: str) -> dict[str, Any]:
    return (await gateway.run(Call("embeddings", {"model": "minilm", "input": text}))).value  # type: ignore[no-any-return]


async def test_the_window_gathers_requests_that_arrive_apart_and_closes_when_full(
        make_kernel) -> None:
    kernel = gathering_kernel(make_kernel)
    async with kernel.running(protocols=False):
        gateway = kernel.service("gateway")
        await asyncio.gather(*(embed(gateway, text) for text in ("one", "two", "three")))
        before = gateway.queues.stats()["minilm"]["served"]
        first = asyncio.ensure_future(embed(gateway, "the first"))
        done, _ = await asyncio.wait({first}, timeout=0.1)  # the others come 0.1 s later
        assert not done  # the first holds the model's turn, gathering
        answers = await asyncio.gather(first, embed(gateway, "the second"),
                                       embed(gateway, "the third"))
        calls = gateway.queues.stats()["minilm"]["served"] - before
    assert [len(answer["data"]) for answer in answers] == [1, 1, 1]
    assert calls == 1  # without the window the first would have run alone
    assert answers[0]["queue_seconds"] < 1  # it ran once the batch was full, not at the end


async def test_a_lone_client_does_not_wait_for_companions(make_kernel) -> None:
    kernel = gathering_kernel(make_kernel)
    async with kernel.running(protocols=False):
        gateway = kernel.service("gateway")
        answers = [await embed(gateway, text) for text in ("one", "two", "three")]
    assert [answer["queue_seconds"] < 1 for answer in answers] == [True] * 3


def test_a_bad_window_is_named(make_kernel) -> None:
    from inferno.kernel import ConfigError

    with pytest.raises(ConfigError, match="embedding_batch_window"):
        make_kernel(None, base="edge", sets=["plugins.gateway.embedding_batch_window=-1"])
