"""Continuous batching of GGUF generation, with Gemma 3 270M: many requests, one decode per step.

Determinism: llama.cpp's CPU kernels compute a batch of rows (a matrix product over several
sequences) in a different order than a single row, so logits in a batch differ from a lone
decode's in the last bits. Where two tokens are nearly tied (Gemma's " largest" against
" capital" after "The capital of France is ... It is the", 0.035 apart) greedy decoding can
then pick the other one. The comparisons below use prompts whose greedy token wins every step
by more than one logit (measured with llama-cpp-python: 1.35 to 2.8), where batched and lone
decoding must agree token for token.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from inferno.kernel import Chunk, GenerationRequest, Kernel, ModelSpec
from inferno.kernel.config import Layers, profiles_dir
from inferno.plugins.auth.keystore import KeyStore
from inferno.plugins.backends.gguf_model import GgufModel
from inferno.plugins.models.errors import ModelError
from tests.conftest import REPO
from tests.servers import ServerThread

pytestmark = pytest.mark.slow
on_module_loop = pytest.mark.asyncio(loop_scope="module")

#: Greedy continuations with wide margins (see the module docstring).
CLEAR = ["1, 2, 3, 4, 5, 6,", "A, B, C, D, E,", "10, 20, 30, 40,", "a b c d e f",
         "The alphabet: A B C D"]
GREEDY = {"temperature": 0, "max_tokens": 12}


async def load_gemma(path: Path, data_dir: Path, options: Mapping[str, Any]
                     ) -> tuple[Kernel, GgufModel]:
    kernel = Kernel(Layers(files=[profiles_dir() / "base.toml"],
                           sets=(f"kernel.data_dir={json.dumps(str(data_dir))}",),
                           overrides={"backends": {"gguf": {"context_size": 1024, **options}}}))
    await kernel.configure().start()
    model = await kernel.drivers("backends")["gguf"].load(
        ModelSpec("gemma", path, "gguf", {}, {}))
    return kernel, model


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gemma(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[GgufModel]:
    """Eight slots, prompts evaluated 64 tokens a step, no prefix reuse."""
    kernel, model = await load_gemma(gemma_path, tmp_path_factory.mktemp("data"),
                                     {"parallel": 8, "batch_size": 64})
    yield model
    await model.close()
    await kernel.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reusing(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[GgufModel]:
    """Two slots that keep their KV for prompts that start the same way (Gemma's sliding
    window layers need the full-size cache for that)."""
    kernel, model = await load_gemma(gemma_path, tmp_path_factory.mktemp("data"),
                                     {"parallel": 2, "prompt_cache": True, "swa_full": True})
    yield model
    await model.close()
    await kernel.stop()


async def run(model: GgufModel, prompt: str, owner: str = "", **params: Any
              ) -> tuple[str, list[Chunk]]:
    request = GenerationRequest("t", prompt=prompt, params={**GREEDY, **params}, owner=owner)
    chunks = [chunk async for chunk in model.generate(request)]
    return "".join(chunk.text for chunk in chunks), chunks


@on_module_loop
async def test_greedy_answers_are_the_same_alone_and_in_a_batch_of_eight(
        gemma: GgufModel) -> None:
    alone = {prompt: (await run(gemma, prompt))[0] for prompt in CLEAR}
    prompts = [CLEAR[index % len(CLEAR)] for index in range(8)]
    steps = gemma.engine.stats.steps  # type: ignore[union-attr]
    together = await asyncio.gather(*(run(gemma, prompt) for prompt in prompts))
    assert [text for text, _ in together] == [alone[prompt] for prompt in prompts]
    # they did run together: twelve tokens each in far fewer than 8 x 12 steps
    assert gemma.engine.stats.steps - steps < 40  # type: ignore[union-attr]


@on_module_loop
async def test_eight_streams_all_finish_with_every_token_counted(gemma: GgufModel) -> None:
    prompts = [f"Story number {index}: once upon a time" for index in range(8)]
    results = await asyncio.gather(*(run(gemma, prompt, temperature=0.8, seed=index,
                                         max_tokens=40, ignore_eos=True)
                                     for index, prompt in enumerate(prompts)))
    for prompt, (text, chunks) in zip(prompts, results, strict=True):
        final = chunks[-1]
        assert final.finish_reason == "length"
        assert final.usage is not None
        assert final.usage["completion_tokens"] == 40 == sum(chunk.tokens for chunk in chunks)
        assert final.usage["prompt_tokens"] == gemma.count_tokens(prompt)
        assert text
    assert gemma.engine.busy_slots == 0  # type: ignore[union-attr]


@on_module_loop
async def test_cancelling_one_of_eight_frees_its_slot_and_the_others_go_on(
        gemma: GgufModel) -> None:
    engine = gemma.engine
    assert engine is not None
    streams = [gemma.generate(GenerationRequest(
        "t", prompt=f"Chapter {index}.", params={"max_tokens": 48, "ignore_eos": True,
                                                 "seed": index}))
               for index in range(8)]

    async def read(stream: AsyncIterator[Chunk], stop_after: int | None) -> list[Chunk]:
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if stop_after is not None and len(chunks) == stop_after:
                await stream.aclose()  # type: ignore[attr-defined]
                break
        return chunks

    readers = [asyncio.ensure_future(read(stream, 3 if index == 0 else None))
               for index, stream in enumerate(streams)]
    cancelled = await readers[0]
    assert len(cancelled) == 3
    assert engine.busy_slots <= 7  # its slot was given back when the close returned
    others = await asyncio.gather(*readers[1:])
    for chunks in others:
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage["completion_tokens"] == 48  # type: ignore[index]
    assert engine.busy_slots == 0


@on_module_loop
async def test_a_long_prompt_is_evaluated_in_budgeted_chunks_while_others_stream(
        gemma: GgufModel) -> None:
    engine = gemma.engine
    assert engine is not None
    received: list[float] = []
    running = gemma.generate(GenerationRequest("t", prompt="Once upon a time", params={
        "max_tokens": 200, "ignore_eos": True, "temperature": 0}))

    async def stream() -> None:
        async for chunk in running:
            if chunk.tokens:
                received.append(time.perf_counter())

    reader = asyncio.ensure_future(stream())
    while len(received) < 5:  # noqa: ASYNC110 - tokens arrive by themselves; just look again
        await asyncio.sleep(0.01)
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 60)  # ~600 tokens
    submitted = time.perf_counter()
    _, chunks = await run(gemma, long_prompt, max_tokens=1)
    first_long_token = submitted + chunks[-1].usage["queue_seconds"] + chunks[-1].usage[  # type: ignore[index]
        "time_to_first_token"]
    during = [moment for moment in received if submitted <= moment <= first_long_token]
    chunk_count = -(-gemma.count_tokens(long_prompt) // 64)
    # the running stream got a token in (nearly) every step of the long prompt's evaluation
    assert len(during) >= chunk_count - 2
    assert engine.stats.largest_prompt_chunk <= 64
    await reader


@on_module_loop
async def test_more_requests_than_slots_wait_and_take_freed_slots(gemma_path: Path,
                                                                  tmp_path: Path) -> None:
    kernel, model = await load_gemma(gemma_path, tmp_path, {"parallel": 2})
    try:
        results = await asyncio.gather(*(run(model, prompt) for prompt in CLEAR))
        assert [text for text, _ in results] == [(await run(model, p))[0] for p in CLEAR]
        waits = sorted(chunks[-1].usage["queue_seconds"]  # type: ignore[index]
                       for _, chunks in results)
        assert waits[-1] > 0  # the last ones waited for a slot ...
        assert model.engine.busy_slots == 0  # type: ignore[union-attr]
        assert model.engine.stats.finished == 2 * len(CLEAR)  # type: ignore[union-attr]
    finally:
        await model.close()
        await kernel.stop()


@on_module_loop
async def test_a_shared_prefix_is_reused_and_counted(reusing: GgufModel) -> None:
    system = "You are a helpful assistant who answers in one sentence. " * 4
    first, chunks = await run(reusing, system + "Question: what is water?", owner="ann")
    assert chunks[-1].usage["cached_tokens"] == 0  # type: ignore[index]
    _, chunks = await run(reusing, system + "Question: what is fire?", owner="ann")
    shared = len(reusing.tokenize(system)) - 1
    assert chunks[-1].usage["cached_tokens"] >= shared  # type: ignore[index]
    # the same prompt again: all but its last token come from the cache
    again, chunks = await run(reusing, system + "Question: what is water?", owner="ann")
    prompt_tokens = chunks[-1].usage["prompt_tokens"]  # type: ignore[index]
    assert chunks[-1].usage["cached_tokens"] == prompt_tokens - 1  # type: ignore[index]
    assert again == first


@on_module_loop
async def test_another_owner_never_reuses_a_cached_prefix(reusing: GgufModel) -> None:
    prompt = "Secret plans of the first owner: step one, step two, step three."
    await run(reusing, prompt, owner="first")
    _, chunks = await run(reusing, prompt, owner="second")
    assert chunks[-1].usage["cached_tokens"] == 0  # type: ignore[index]
    _, chunks = await run(reusing, prompt, owner="first")
    assert chunks[-1].usage["cached_tokens"] > 0  # type: ignore[index]


@on_module_loop
async def test_json_schema_answers_parse_under_batching(gemma: GgufModel) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    answers = await asyncio.gather(*(run(
        gemma, f"Person {index} as JSON:", response_format="json_schema", schema=schema,
        max_tokens=60, temperature=0.7, seed=index) for index in range(4)))
    for text, chunks in answers:
        assert chunks[-1].finish_reason == "stop", text
        value = json.loads(text)
        assert isinstance(value["name"], str)
        assert isinstance(value["age"], int)


@on_module_loop
async def test_embeddings_run_on_the_engine_beside_generation(gemma: GgufModel) -> None:
    alone = await gemma.embed(["a cat sat on the mat"])
    generating = asyncio.ensure_future(run(gemma, "Once upon a time", max_tokens=30,
                                           ignore_eos=True))
    together = await gemma.embed(["a cat sat on the mat", "stock markets fell sharply"])
    await generating
    cosine = sum(a * b for a, b in zip(alone[0], together[0], strict=True))
    assert cosine > 0.999  # batched with another input, the vector barely moves
    assert sum(a * b for a, b in zip(together[0], together[1], strict=True)) < 0.9


@on_module_loop
async def test_a_request_that_fits_only_without_its_cached_prefix_still_starts(
        gemma_path: Path, tmp_path: Path) -> None:
    # one context's worth of cache for two slots: the first answer's cache plus the second
    # request's reservation would overflow it, so the prefix is given up, not waited for
    kernel, model = await load_gemma(gemma_path, tmp_path, {
        "context_size": 256, "parallel": 2, "prompt_cache": True, "swa_full": True})
    prompt = "The capital of France is Paris. The capital of Italy is"
    try:
        await run(model, prompt, max_tokens=8, ignore_eos=True)
        # 13 prompt tokens + 236: with the first answer's 20 cached tokens kept, 269 > 256
        _, chunks = await asyncio.wait_for(run(model, prompt, max_tokens=236), 120)
        assert chunks[-1].finish_reason in ("stop", "length")
        assert chunks[-1].usage["cached_tokens"] == 0  # type: ignore[index]
    finally:
        await model.close()
        await kernel.stop()


@on_module_loop
async def test_a_fault_in_the_engine_fails_its_requests_and_refuses_later_ones(
        gemma_path: Path, tmp_path: Path) -> None:
    kernel, model = await load_gemma(gemma_path, tmp_path, {"parallel": 2})
    engine = model.engine
    assert engine is not None

    def broken(*args: Any) -> None:  # stands in for a bug in one step
        raise RuntimeError("fault in a step")

    engine._accept = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(ModelError, match="fault in a step"):
            await asyncio.wait_for(run(model, "Hello"), 60)
        with pytest.raises(ModelError, match="engine stopped after an error"):
            await asyncio.wait_for(run(model, "Hello again"), 60)
        with pytest.raises(ModelError, match="engine stopped after an error"):
            await asyncio.wait_for(model.embed(["text"]), 60)
    finally:
        await model.close()
        await kernel.stop()


# --------------------------------------------------------------------------- through HTTP


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The edge profile with API keys, two slots, one waiting request and prefix reuse."""
    folder = tmp_path_factory.mktemp("keyed")
    store = KeyStore(folder / "keys.sqlite")
    keys = {name: store.create(name, roles=["user"])[1] for name in ("ann", "bob")}
    keys["ops"] = store.create("ops", roles=["admin"])[1]
    sets = ["auth.none.enabled=false", f'auth.api_key.store="{folder / "keys.sqlite"}"',
            "backends.gguf.parallel=2", "backends.gguf.prompt_cache=true",
            "backends.gguf.swa_full=true", "plugins.gateway.queue_limit=1"]
    with ServerThread("edge", folder / "data", sets=sets) as server:
        yield server, keys
    store.close()


async def complete(session: aiohttp.ClientSession, url: str, key: str, prompt: str,
                   **body: Any) -> tuple[int, dict[str, Any]]:
    async with session.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": "gemma-3-270m", "prompt": prompt, **GREEDY,
                                  **body}) as response:
        return response.status, await response.json()


async def test_a_full_queue_answers_503_while_two_slots_run(keyed: Any) -> None:
    server, keys = keyed
    async with aiohttp.ClientSession() as session:
        # loaded, the model says it serves two at once; until then the queue runs one
        assert (await complete(session, server.url, keys["ann"], "Hello"))[0] == 200
        answers = await asyncio.gather(*(complete(
            session, server.url, keys["ann"], f"Tale {index}:", max_tokens=60, ignore_eos=True)
            for index in range(4)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200, 200, 200, 503]  # two running, one waiting, one refused
    refused = next(body for status, body in answers if status == 503)
    assert refused["error"]["code"] == "queue_full"
    assert all(body["usage"]["completion_tokens"] == 60
               for status, body in answers if status == 200)


async def test_cached_tokens_are_reported_and_never_shared_between_keys(keyed: Any) -> None:
    server, keys = keyed
    prompt = "Ann's private notes: the meeting is on Tuesday at noon in room four. Summary:"
    async with aiohttp.ClientSession() as session:
        _, first = await complete(session, server.url, keys["ann"], prompt)
        _, other = await complete(session, server.url, keys["bob"], prompt)
        _, again = await complete(session, server.url, keys["ann"], prompt)
    cached = [body["usage"].get("prompt_tokens_details", {}).get("cached_tokens")
              for body in (first, other, again)]
    assert cached[:2] == [0, 0]
    assert cached[2] == again["usage"]["prompt_tokens"] - 1


async def test_slots_queue_and_step_sizes_are_exported(keyed: Any) -> None:
    server, keys = keyed
    headers = {"Authorization": f"Bearer {keys['ops']}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        await asyncio.gather(*(complete(session, server.url, keys["ann"], f"Song {index}:")
                               for index in range(2)))
        async with session.get(server.url + "/api/v1/status") as response:
            status = await response.json()
        async with session.get(server.url + "/metrics") as response:
            text = await response.text()
    batching = next(row["batching"] for row in status["loaded"] if row["name"] == "gemma-3-270m")
    assert (batching["slots"], batching["slots_busy"], batching["waiting"]) == (2, 0, 0)
    steps = batching["steps"]
    assert steps > 0
    assert sum(batching["sequences_per_step"]["counts"]) == steps
    model = 'model="gemma-3-270m"'
    assert f"inferno_batch_slots{{{model}}} 2.0" in text
    assert f"inferno_batch_slots_busy{{{model}}} 0.0" in text
    assert f"inferno_batch_steps_total{{{model}}} {float(steps)}" in text
    # both requests ran in steps of two sequences at least once
    two = next(line for line in text.splitlines() if line.startswith(
        f'inferno_batch_sequences_per_step_bucket{{le="2",{model}}}')
        or line.startswith(f'inferno_batch_sequences_per_step_bucket{{{model},le="2"}}'))
    one = next(line for line in text.splitlines() if line.startswith(
        f'inferno_batch_sequences_per_step_bucket{{le="1",{model}}}')
        or line.startswith(f'inferno_batch_sequences_per_step_bucket{{{model},le="1"}}'))
    assert float(two.split()[-1]) > float(one.split()[-1])


async def test_a_waiting_request_of_a_higher_priority_role_goes_first(
        tmp_path: Path) -> None:
    """One slot: while Ann's request runs, Bob's waits, then the admin's arrives. The admin
    role has priority 10 (``plugins.gateway.priorities``), so it runs before Bob's."""
    store = KeyStore(tmp_path / "keys.sqlite")
    keys = {name: store.create(name, roles=["user"])[1] for name in ("ann", "bob")}
    keys["ops"] = store.create("ops", roles=["admin"])[1]
    sets = ["auth.none.enabled=false", f'auth.api_key.store="{tmp_path / "keys.sqlite"}"',
            "backends.gguf.parallel=1", "plugins.gateway.priorities={admin = 10}"]
    finished: list[str] = []

    async def ask(session: aiohttp.ClientSession, url: str, name: str, tokens: int) -> None:
        status, body = await complete(session, url, keys[name], f"{name}'s story:",
                                      max_tokens=tokens, ignore_eos=True)
        assert status == 200, body
        finished.append(name)

    async def queued(session: aiohttp.ClientSession, url: str, running: int,
                     waiting: int) -> None:
        """Until the model's queue holds that many (the server's own status says so)."""
        for _ in range(600):
            async with session.get(url + "/api/v1/status", headers={
                    "Authorization": f"Bearer {keys['ops']}"}) as response:
                queue = (await response.json())["queues"].get("gemma-3-270m", {})
            if (queue.get("running"), queue.get("waiting")) == (running, waiting):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the queue never held {running} running and {waiting} waiting")

    with ServerThread("edge", tmp_path / "data", sets=sets) as server:
        async with aiohttp.ClientSession() as session:
            assert (await complete(session, server.url, keys["ann"], "Hello"))[0] == 200
            # Ann's request runs long enough for the other two to line up behind it
            running = asyncio.ensure_future(ask(session, server.url, "ann", 400))
            await queued(session, server.url, 1, 0)
            bob = asyncio.ensure_future(ask(session, server.url, "bob", 8))
            await queued(session, server.url, 1, 1)
            ops = asyncio.ensure_future(ask(session, server.url, "ops", 8))
            await queued(session, server.url, 1, 2)
            await asyncio.gather(running, bob, ops)
    store.close()
    assert finished == ["ann", "ops", "bob"]


#: Loads a batching model, starts a request and leaves without closing anything.
UNCLOSED = """
import asyncio, sys
from pathlib import Path
from inferno.kernel import GenerationRequest
from tests.test_batching import load_gemma

async def main():
    kernel, model = await load_gemma(Path(sys.argv[1]), Path(sys.argv[2]), {"parallel": 2})
    request = GenerationRequest("t", prompt="1, 2, 3,", params={"max_tokens": 500})
    async for chunk in model.generate(request):
        print("streaming", flush=True)
        return

asyncio.run(main())
"""


def test_a_process_that_never_closes_its_model_still_ends(gemma_path: Path,
                                                          tmp_path: Path) -> None:
    """At exit Python joins every worker thread, and the engine's loop holds its model's
    thread until stopped: without the exit hook that stops it, this process never ends."""
    done = subprocess.run([sys.executable, "-c", UNCLOSED, str(gemma_path), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "streaming" in done.stdout.splitlines()
