"""The response cache's tiers and keys, on a real kernel: the memory tier's LRU bounds and
expiry, the disk tier across restarts and a SIGKILL mid-write, its compression, and what
makes two requests one cache entry (through the real gateway and real models)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from inferno.kernel import Kernel, Principal
from inferno.plugins.cache.events import CacheEvicted
from inferno.plugins.cache.keys import describe, make_key
from inferno.plugins.gateway.calls import Call, StreamReply
from tests.conftest import REPO
from tests.model_files import write_tiny_gguf

ADMIN = Principal("test", roles=frozenset({"admin"}))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def run(kernel: Kernel, scenario: Callable[[Kernel], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with kernel.running(protocols=False):
            return await scenario(kernel)
    return asyncio.run(main())


def payload(index: int) -> bytes:
    """Incompressible bytes of a size that varies with ``index`` (some over diskcache's
    32 KiB, which go to files of their own)."""
    return random.Random(index).randbytes(1000 + index * 7919 % 90_000)


# --------------------------------------------------------------------------- memory


def test_the_memory_tier_drops_the_least_recently_used_beyond_max_entries(make_kernel):
    kernel = make_kernel({"cache": {"memory": {"max_entries": 2}}})

    async def scenario(kernel: Kernel) -> tuple[list[Any], dict[str, int], list[Any]]:
        seen: list[CacheEvicted] = []
        kernel.bus.subscribe(CacheEvicted, seen.append)
        tier = kernel.drivers("cache")["memory"]
        await tier.put(b"m/a", b"1")
        await tier.put(b"m/b", b"2")
        await tier.get(b"m/a")  # a is now the most recently used
        await tier.put(b"m/c", b"3")
        found = [await tier.get(key) for key in (b"m/a", b"m/b", b"m/c")]
        await kernel.bus.drain()
        return found, dict(tier.stats()), seen

    found, stats, events = run(kernel, scenario)
    assert found == [b"1", None, b"3"]
    assert (stats["entries"], stats["evictions"], stats["hits"], stats["misses"]) == (2, 1, 3, 1)
    assert [(e.tier, e.entries, e.reason) for e in events] == [("memory", 1, "full")]


def test_the_memory_tier_drops_entries_beyond_max_bytes(make_kernel):
    kernel = make_kernel({"cache": {"memory": {"max_bytes": 250}}})

    async def scenario(kernel: Kernel) -> tuple[list[Any], dict[str, int]]:
        tier = kernel.drivers("cache")["memory"]
        for name in (b"m/a", b"m/b", b"m/c"):
            await tier.put(name, b"x" * 100)
        await tier.put(b"m/huge", b"y" * 251)  # larger than the whole tier: not kept
        return [await tier.get(k) is not None for k in (b"m/a", b"m/b", b"m/c", b"m/huge")], \
            dict(tier.stats())

    present, stats = run(kernel, scenario)
    assert present == [False, True, True, False]
    assert (stats["bytes"], stats["entries"]) == (200, 2)


def test_a_memory_entry_expires_after_its_ttl(make_kernel):
    kernel = make_kernel({"cache": {"memory": {"ttl": 60}}})

    async def scenario(kernel: Kernel) -> list[Any]:
        tier = kernel.drivers("cache")["memory"]
        tier.clock = clock = Clock()
        await tier.put(b"m/a", b"1")
        await tier.put(b"m/b", b"2", ttl=0)  # 0: until evicted
        clock.now += 59.9
        fresh = await tier.get(b"m/a")
        clock.now += 0.2
        return [fresh, await tier.get(b"m/a"), await tier.get(b"m/b"),
                tier.stats()["entries"]]

    assert run(kernel, scenario) == [b"1", None, b"2", 1]


def test_clearing_one_model_leaves_the_others_entries_in_every_tier(make_kernel):
    kernel = make_kernel({"cache": {"memory": {}, "disk": {}}})

    async def scenario(kernel: Kernel) -> tuple[dict[str, int], list[Any]]:
        cache = kernel.service("cache")
        for tier in cache.tiers.values():
            await tier.put(b"tiny/1", b"a")
            await tier.put(b"tiny/2", b"b")
            await tier.put(b"minilm/1", b"c")
        removed = await cache.clear(model="tiny")
        left = [await t.get(k) for t in cache.tiers.values() for k in (b"tiny/1", b"minilm/1")]
        return removed, left

    removed, left = run(kernel, scenario)
    assert removed == {"memory": 2, "disk": 2}
    assert left == [None, b"c", None, b"c"]


# --------------------------------------------------------------------------- disk


def test_disk_entries_survive_a_restart(make_kernel):
    async def write(kernel: Kernel) -> None:
        await kernel.drivers("cache")["disk"].put(b"m/kept", b"answer")

    async def read(kernel: Kernel) -> Any:
        return await kernel.drivers("cache")["disk"].get(b"m/kept")

    run(make_kernel({"cache": {"disk": {}}}), write)
    assert run(make_kernel({"cache": {"disk": {}}}), read) == b"answer"


def test_the_disk_tier_stores_a_repetitive_value_compressed(make_kernel, inferno_data_dir):
    import diskcache

    value = b"the same sentence, again and again. " * 3000

    async def scenario(kernel: Kernel) -> Any:
        tier = kernel.drivers("cache")["disk"]
        await tier.put(b"m/long", value)
        return await tier.get(b"m/long")

    assert run(make_kernel({"cache": {"disk": {"zstd_level": 19}}}), scenario) == value
    with diskcache.Cache(str(inferno_data_dir / "cache" / "disk")) as raw:
        stored = raw.get(b"m/long")
    assert len(stored) < len(value) / 20


def test_a_disk_entry_expires_after_its_ttl(make_kernel, monkeypatch):
    import diskcache.core

    clock = Clock()
    monkeypatch.setattr(diskcache.core, "time", types.SimpleNamespace(
        time=clock, sleep=lambda _: None))

    async def scenario(kernel: Kernel) -> list[Any]:
        tier = kernel.drivers("cache")["disk"]
        await tier.put(b"m/a", b"1")
        clock.now += 99
        fresh = await tier.get(b"m/a")
        clock.now += 2
        return [fresh, await tier.get(b"m/a")]

    assert run(make_kernel({"cache": {"disk": {"ttl": 100}}}), scenario) == [b"1", None]


WRITER = """
import asyncio, json, random, sys
from inferno.kernel import Kernel
from inferno.kernel.config import Layers, profiles_dir

def payload(index):
    return random.Random(index).randbytes(1000 + index * 7919 % 90_000)

async def main():
    layers = Layers(files=[profiles_dir() / "base.toml"],
                    sets=(f"kernel.data_dir={json.dumps(sys.argv[1])}",),
                    overrides={"cache": {"disk": {}}})
    kernel = Kernel(layers)
    async with kernel.running(protocols=False):
        tier = kernel.drivers("cache")["disk"]
        index = 0
        while True:
            await tier.put(b"m/%d" % index, payload(index))
            print("written", index, flush=True)
            index += 1

asyncio.run(main())
"""


def test_a_writer_killed_mid_write_leaves_every_entry_absent_or_intact(make_kernel,
                                                                       inferno_data_dir):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(inferno_data_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              cwd=REPO)
    assert writer.stdout is not None
    written = -1
    for line in writer.stdout:  # its log lines come here too
        if line.startswith("written "):
            written = int(line.split()[1])
        if written >= 60:
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    writer.stdout.close()
    assert written >= 60, "the writer never got going"

    async def read_all(kernel: Kernel) -> list[bytes | None]:
        tier = kernel.drivers("cache")["disk"]
        return [await tier.get(b"m/%d" % index) for index in range(written + 20)]

    found = run(make_kernel({"cache": {"disk": {}}}), read_all)
    for index, value in enumerate(found):
        assert value is None or value == payload(index), f"entry {index} is corrupt"
    assert all(value is not None for value in found[:written + 1])  # committed before kill


# --------------------------------------------------------------------------- keys


def test_the_same_request_with_its_keys_in_another_order_has_one_key():
    first = json.loads('{"model": "tiny", "temperature": 0, "max_tokens": 5, "messages": '
                       '[{"role": "user", "content": "hi"}], "response_format": {"type": '
                       '"json_schema", "json_schema": {"schema": {"type": "object", '
                       '"required": ["a"]}}}}')
    second = json.loads('{"response_format": {"json_schema": {"schema": {"required": ["a"], '
                        '"type": "object"}}, "type": "json_schema"}, "messages": [{"content": '
                        '"hi", "role": "user"}], "max_tokens": 5, "temperature": 0.0, '
                        '"model": "tiny", "stream": true}')
    keys = [make_key("tiny", describe("chat", body).material) for body in (first, second)]
    assert keys[0] == keys[1]
    other = make_key("tiny", describe("chat", {**first, "max_tokens": 6}).material)
    assert other != keys[0]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf", context_length=512)


def model_kernel(make_kernel, tiny: Path) -> Kernel:
    return make_kernel({"cache": {"memory": {}},
                        "plugins": {"models": {"watch_interval": 0,
                                               "entries": {"tiny": {"path": str(tiny)}}}}},
                       base="edge")


async def ask(kernel: Kernel, operation: str, body: dict[str, Any]) -> tuple[str, Any]:
    """What the call was told (hit, miss, bypass) and its answer."""
    call = Call(operation, body, principal=ADMIN)
    reply = await kernel.service("gateway").run(call)
    if isinstance(reply, StreamReply):
        try:
            text, _ = await reply.collect()
        finally:
            await reply.aclose()
        return call.meta.get("cache", ""), text
    return call.meta.get("cache", ""), reply.value


COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 6}


def test_only_deterministic_generations_are_cached(make_kernel, tiny):
    async def scenario(kernel: Kernel) -> list[str]:
        told = []
        for extra in ({"temperature": 0.7}, {"temperature": 0.7}, {}, {"temperature": 0},
                      {"temperature": 0}, {"temperature": 0.7, "seed": 4},
                      {"temperature": 0.7, "seed": 4}):
            told.append((await ask(kernel, "completion", {**COMPLETION, **extra}))[0])
        return told

    assert run(model_kernel(make_kernel, tiny), scenario) == [
        "bypass", "bypass", "bypass", "miss", "hit", "miss", "hit"]


def test_embeddings_are_cached_and_a_hit_is_the_same_answer(make_kernel, tiny):
    async def scenario(kernel: Kernel) -> list[tuple[str, Any]]:
        body = {"model": "minilm", "input": ["a sentence", "another"]}
        return [await ask(kernel, "embeddings", body) for _ in range(2)]

    (first, made), (second, served) = run(model_kernel(make_kernel, tiny), scenario)
    assert (first, second) == ("miss", "hit")
    assert served["data"] == made["data"]


def test_no_store_and_refresh_in_the_body(make_kernel, tiny):
    async def scenario(kernel: Kernel) -> list[str]:
        body = {**COMPLETION, "temperature": 0}
        return [(await ask(kernel, "completion", {**body, **extra}))[0] for extra in
                ({"cache": "no-store"}, {"cache": False}, {}, {"cache": "refresh"}, {})]

    assert run(model_kernel(make_kernel, tiny), scenario) == [
        "bypass", "bypass", "miss", "miss", "hit"]


def test_a_changed_model_file_is_a_miss(make_kernel, tiny):
    async def scenario(kernel: Kernel) -> list[str]:
        body = {**COMPLETION, "temperature": 0}
        told = [(await ask(kernel, "completion", body))[0] for _ in range(2)]
        write_tiny_gguf(tiny, context_length=512, seed=1)  # a new version of the file
        told += [(await ask(kernel, "completion", body))[0] for _ in range(2)]
        return told

    assert run(model_kernel(make_kernel, tiny), scenario) == ["miss", "hit", "miss", "hit"]
