"""Load on an OpenAI-compatible server: streaming requests at a fixed concurrency or as
Poisson arrivals, with the latency figures vLLM's serving benchmark reports.

    python bench/serve_load.py --base-url http://127.0.0.1:8080 --model gemma-3-270m \\
        [--concurrency 8 | --rate 4] [--requests 32] [--max-tokens 64] [--api chat] \\
        [--prompt TEXT ...] [--temperature 0] [--no-ignore-eos] [--json results.json]

Any server that speaks ``/v1/completions`` or ``/v1/chat/completions`` with server-sent
events can be measured, so the same script measures Inferno and llama.cpp's llama-server
(bench/serve_compare.py runs both).

Each request streams ``max_tokens`` tokens (``ignore_eos`` asks the server not to stop at
the end-of-sequence token; ``--no-ignore-eos`` leaves it out for servers that refuse it).
Per request it records:

  TTFT   time to first token: from sending the request to the first event with text.
  TPOT   time per output token after the first: (end-to-end - TTFT) / (tokens - 1).
  ITL    inter-token latency: the gaps between successive events with text (an event
         carrying several tokens counts as one gap, as in vLLM).
  E2E    end-to-end latency: from sending the request to the end of the stream.
  tokens the server's ``usage.completion_tokens`` when it reports one (the script asks
         with ``stream_options.include_usage``), else the number of events with text.

Aggregate output tokens/s and requests/s are taken over the run's wall time, from the
first request sent to the last stream ended. Requests that fail are counted and shown
with their first error; their tokens still count as delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

#: Openings a base model continues at length, so that a server that stops at the
#: end-of-sequence token (no ``ignore_eos``) still streams close to ``max_tokens``.
PROMPTS = (
    "The history of the printing press begins",
    "In the early morning the fishing boats left the harbour, and",
    "The city council met on Tuesday to discuss the new railway line, which",
    "Photosynthesis is the process by which plants",
    "The expedition reached the foot of the mountain after three weeks of",
    "When the first steam engines were built, most people",
    "The library's oldest manuscript was written on parchment in",
    "Our guide explained that the river had changed its course several times because",
)


@dataclass
class LoadConfig:
    """One run's settings; ``concurrency`` caps streams in flight, ``rate`` (requests per
    second) switches from a fixed number of busy clients to Poisson arrivals."""

    base_url: str
    model: str
    api: str = "completions"
    prompts: Sequence[str] = PROMPTS
    requests: int = 32
    concurrency: int | None = 8
    rate: float | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = True
    warmup: int = 1
    timeout: float = 600.0
    seed: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse settings that would measure nothing, naming the option at fault."""
        if self.api not in ("completions", "chat"):
            raise ValueError(f"--api must be completions or chat, not {self.api!r}")
        if self.requests < 1:
            raise ValueError(f"--requests must be at least 1, not {self.requests}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, not {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"--rate must be above 0 requests per second, not {self.rate}")
        if self.concurrency is None and self.rate is None:
            raise ValueError("give --concurrency, --rate or both")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be at least 1, not {self.max_tokens}")
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise ValueError("every prompt must be a non-empty string")


@dataclass
class RequestResult:
    """What one streamed request measured; times in seconds."""

    index: int
    prompt_index: int
    sent: float = 0.0  # since the run started
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    text_events: int = 0
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.tokens - 1)


def request_body(config: LoadConfig, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": config.model, "max_tokens": config.max_tokens,
                            "temperature": config.temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if config.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if config.ignore_eos:
        body["ignore_eos"] = True
    return body


def endpoint(config: LoadConfig) -> str:
    path = "/v1/chat/completions" if config.api == "chat" else "/v1/completions"
    return config.base_url.rstrip("/") + path


def event_text(event: dict[str, Any], api: str) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if api == "chat":
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


async def stream_one(session: aiohttp.ClientSession, config: LoadConfig,
                     result: RequestResult, started: float) -> None:
    """Send one request and read its events as they arrive, filling ``result``."""
    body = request_body(config, config.prompts[result.prompt_index])
    sent = time.perf_counter()
    result.sent = sent - started
    last: float | None = None
    try:
        async with session.post(endpoint(config), json=body) as response:
            if response.status != 200:
                detail = (await response.text())[:300]
                result.error = f"HTTP {response.status}: {detail}"
                return
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # comments (keep-alives), blank separators
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"error event: {json.dumps(event['error'])[:300]}"
                    break
                now = time.perf_counter()
                if event_text(event, config.api):
                    result.text_events += 1
                    if result.ttft is None:
                        result.ttft = now - sent
                    elif last is not None:
                        result.itl.append(now - last)
                    last = now
                for choice in event.get("choices") or []:
                    if choice.get("finish_reason"):
                        result.finish_reason = str(choice["finish_reason"])
                usage = event.get("usage")
                if usage:
                    result.usage_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"[:300]
    finally:
        result.e2e = time.perf_counter() - sent
        result.tokens = (result.usage_tokens if result.usage_tokens is not None
                         else result.text_events)


async def run_load(config: LoadConfig) -> dict[str, Any]:
    """Run the warm-up, then the measured requests; the summary and every request."""
    config.check()
    # A fresh connection per request: llama-server (cpp-httplib) closes kept-alive
    # connections after a few requests, and a request written to one it has just closed
    # fails. Connecting over loopback costs well under a millisecond, alike for every server.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=config.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers=config.headers) as session:
        # Warm-up requests take prompts from the end of the list, so that given more prompts
        # than requests, no measured request repeats one (a server may cache its prefix).
        prompts = len(config.prompts)
        for index in range(config.warmup):
            warm = RequestResult(-1 - index, (prompts - 1 - index) % prompts)
            await stream_one(session, config, warm, time.perf_counter())
            if warm.error:
                raise RuntimeError(f"the warm-up request to {endpoint(config)} failed: "
                                   f"{warm.error}")
        results = [RequestResult(i, i % len(config.prompts)) for i in range(config.requests)]
        started = time.perf_counter()
        if config.rate is None:
            await _fixed_concurrency(session, config, results, started)
        else:
            await _poisson(session, config, results, started)
        duration = time.perf_counter() - started
    return {"config": _config_record(config), "summary": summarise(config, results, duration),
            "requests": [{**asdict(r), "tpot": r.tpot} for r in results]}


async def _fixed_concurrency(session: aiohttp.ClientSession, config: LoadConfig,
                             results: list[RequestResult], started: float) -> None:
    """``concurrency`` clients, each sending its next request as soon as one ends."""
    queue = iter(results)

    async def client() -> None:
        for result in queue:  # the shared iterator hands each request to one client
            await stream_one(session, config, result, started)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(config.concurrency or 1, len(results))):
            group.create_task(client())


async def _poisson(session: aiohttp.ClientSession, config: LoadConfig,
                   results: list[RequestResult], started: float) -> None:
    """Requests sent at Poisson arrival times (exponential gaps at ``rate`` per second,
    seeded), with at most ``concurrency`` in flight when that is set."""
    assert config.rate is not None
    rng = random.Random(config.seed)
    limit = asyncio.Semaphore(config.concurrency or len(results))

    async def send(result: RequestResult) -> None:
        async with limit:
            await stream_one(session, config, result, started)

    async with asyncio.TaskGroup() as group:
        due = 0.0
        for result in results:
            delay = started + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            group.create_task(send(result))
            due += rng.expovariate(config.rate)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, p50, p90 and p99 (linear interpolation between ranks), in milliseconds."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        position = q * (len(ordered) - 1)
        low, high = math.floor(position), math.ceil(position)
        value = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
        return round(value * 1000, 2)

    return {"mean": round(sum(ordered) / len(ordered) * 1000, 2),
            "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99)}


def summarise(config: LoadConfig, results: Sequence[RequestResult], duration: float
              ) -> dict[str, Any]:
    completed = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    tokens = sum(r.tokens for r in results)
    return {
        "requests": len(results),
        "completed": len(completed),
        "failed": len(failed),
        "first_error": failed[0].error if failed else None,
        "duration_s": round(duration, 3),
        "tokens_delivered": tokens,
        "tokens_requested": config.max_tokens * len(results),
        "requests_full_length": sum(r.tokens == config.max_tokens for r in completed),
        "finish_reasons": dict(Counter(r.finish_reason or "none" for r in completed)),
        "output_tokens_per_s": round(tokens / duration, 2) if duration else None,
        "requests_per_s": round(len(completed) / duration, 3) if duration else None,
        "ttft_ms": percentiles([r.ttft for r in completed if r.ttft is not None]),
        "tpot_ms": percentiles([t for r in completed if (t := r.tpot) is not None]),
        "itl_ms": percentiles([gap for r in completed for gap in r.itl]),
        "e2e_ms": percentiles([r.e2e for r in completed if r.e2e is not None]),
    }


def _config_record(config: LoadConfig) -> dict[str, Any]:
    record = asdict(config)
    record["prompts"] = list(config.prompts)
    record["headers"] = sorted(config.headers)  # names only: values may be credentials
    return record


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table."""
    lines = [
        f"requests          {summary['completed']} completed, {summary['failed']} failed"
        f" of {summary['requests']} in {summary['duration_s']:.2f} s",
        f"tokens delivered  {summary['tokens_delivered']} of {summary['tokens_requested']}"
        f" requested ({summary['requests_full_length']} requests at full length;"
        f" finish reasons {summary['finish_reasons']})",
        f"throughput        {summary['output_tokens_per_s']} output tokens/s,"
        f" {summary['requests_per_s']} requests/s",
        f"{'latency (ms)':<17} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}",
    ]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                       ("e2e_ms", "E2E")):
        row = summary[key]
        cells = " ".join(f"{'-' if row[q] is None else f'{row[q]:.1f}':>9}"
                         for q in ("mean", "p50", "p90", "p99"))
        lines.append(f"  {label:<15} {cells}")
    if summary["first_error"]:
        lines.append(f"first error       {summary['first_error']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[LoadConfig, Path | None]:
    """The run's settings and where to write the JSON report, if anywhere."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", required=True,
                        help="the server's root, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", required=True, help="the model name the server knows")
    parser.add_argument("--api", choices=["completions", "chat"], default="completions")
    parser.add_argument("--requests", type=int, default=32, help="measured requests")
    parser.add_argument("--concurrency", type=int,
                        help="streams in flight (default 8 without --rate; a cap with it)")
    parser.add_argument("--rate", type=float,
                        help="Poisson arrivals at this many requests per second")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="send ignore_eos so that every request streams max_tokens")
    parser.add_argument("--prompt", action="append", dest="prompts",
                        help="a prompt (repeatable; requests take them in turn)")
    parser.add_argument("--prompt-file", type=Path,
                        help="a file with one prompt per line (blank lines skipped)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured requests sent one at a time first")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                        help="a header sent with every request, e.g. 'Authorization:Bearer KEY'")
    parser.add_argument("--json", type=Path, help="write the summary and every request here")
    args = parser.parse_args(argv)
    prompts = list(args.prompts or [])
    if args.prompt_file:
        prompts += [line for line in args.prompt_file.read_text().splitlines() if line.strip()]
    headers = {}
    for item in args.header:
        name, colon, value = item.partition(":")
        if not colon or not name.strip():
            parser.error(f"--header {item!r} is not NAME:VALUE")
        headers[name.strip()] = value.strip()
    concurrency = args.concurrency if args.concurrency or args.rate else 8
    config = LoadConfig(base_url=args.base_url, model=args.model, api=args.api,
                        prompts=prompts or PROMPTS, requests=args.requests,
                        concurrency=concurrency, rate=args.rate, max_tokens=args.max_tokens,
                        temperature=args.temperature, ignore_eos=args.ignore_eos,
                        warmup=args.warmup, timeout=args.timeout, seed=args.seed,
                        headers=headers)
    try:
        config.check()
    except ValueError as error:
        parser.error(str(error))
    return config, args.json


def main(argv: Sequence[str] | None = None) -> int:
    config, path = parse_args(argv)
    report = asyncio.run(run_load(config))
    print(format_summary(report["summary"]))
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 1 if report["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
