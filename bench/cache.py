"""What a response cache hit costs over loopback HTTP, against a miss that runs the model.

One edge kernel runs in this process with a memory and a disk tier. Embeddings (MiniLM):
a miss is a new input each time (the model runs), a hit repeats one input (answered from
the memory tier). Chat (a tiny random GGUF, 16 tokens at temperature 0): a miss is a new
prompt each time, a hit repeats one prompt, as a plain and as a streamed request.

    python bench/cache.py [--requests 2000] [--json]

The issue's budget: a hit's p50 over HTTP at most 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

BUDGET_MS = 1.0
REPO = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(count: int, work: Callable[[int], Awaitable[str]], expect: str
                ) -> list[float]:
    """Milliseconds per call of ``work(i)``, after a warm-up of 50; each must be told
    ``expect`` (hit or miss)."""
    times = []
    for index in range(count + 50):
        started = time.perf_counter()
        told = await work(index)
        elapsed = (time.perf_counter() - started) * 1000
        assert told == expect, f"expected {expect}, the server said {told}"
        if index >= 50:
            times.append(elapsed)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(times), 3),
            "p90_ms": round(percentile(times, 0.9), 3), "n": len(times)}


async def measure(count: int) -> dict[str, Any]:
    import aiohttp

    from inferno.kernel import Kernel

    sys.path.insert(0, str(REPO))
    from tests.model_files import write_tiny_gguf

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny = write_tiny_gguf(root / "tiny.gguf", context_length=512)
        kernel = Kernel.from_profile("edge", sets=[
            f'kernel.data_dir="{root / "data"}"', "protocols.http.port=0",
            "plugins.models.watch_interval=0", f'plugins.models.entries.tiny.path="{tiny}"',
            "cache.memory.max_entries=100000", "cache.disk.zstd_level=3"])
        async with kernel.running(), aiohttp.ClientSession() as session:
            base = kernel.drivers("protocols")["http"].url  # type: ignore[attr-defined]

            async def post(path: str, body: dict[str, Any]) -> str:
                async with session.post(base + path, json=body) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
                    return response.headers["X-Inferno-Cache"]

            def embed(text: str) -> dict[str, Any]:
                return {"model": "minilm", "input": text}

            def chat(text: str, stream: bool = False) -> dict[str, Any]:
                return {"model": "tiny", "temperature": 0, "max_tokens": 16, "stream": stream,
                        "messages": [{"role": "user", "content": text}]}

            await post("/v1/embeddings", embed("the one"))
            await post("/v1/chat/completions", chat("the one"))
            await kernel.service("cache").settled()
            result = {
                "embeddings_miss": summary(await timed(
                    max(100, count // 10),
                    lambda i: post("/v1/embeddings", embed(f"new sentence {i}")), "miss")),
                "embeddings_hit": summary(await timed(
                    count, lambda i: post("/v1/embeddings", embed("the one")), "hit")),
                "chat_miss": summary(await timed(
                    max(100, count // 10),
                    lambda i: post("/v1/chat/completions", chat(f"prompt {i}")), "miss")),
                "chat_hit": summary(await timed(
                    count, lambda i: post("/v1/chat/completions", chat("the one")), "hit")),
                "chat_stream_hit": summary(await timed(
                    count, lambda i: post("/v1/chat/completions", chat("the one", True)),
                    "hit")),
            }
    result["within_budget"] = all(result[name]["p50_ms"] <= BUDGET_MS
                                  for name in ("embeddings_hit", "chat_hit"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    from inferno.kernel.logs import configure_logging

    configure_logging("console", "warning", {})
    result = asyncio.run(measure(args.requests))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, row in result.items():
        if isinstance(row, dict):
            print(f"{name:16} p50 {row['p50_ms']:8.3f} ms   p90 {row['p90_ms']:8.3f} ms   "
                  f"({row['n']} requests)")
    print(f"hit p50 {'within' if result['within_budget'] else 'OVER'} the "
          f"{BUDGET_MS:g} ms budget")


if __name__ == "__main__":
    main()
