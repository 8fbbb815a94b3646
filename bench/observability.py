"""What metrics and traces cost a streaming generation, against the same kernel with both off.

Two edge kernels run in this process: "off" has neither exporter; "on" has
``[exporters.prometheus]`` and ``[exporters.otel]`` (every call sampled, its spans batched
to the console exporter writing to /dev/null: the SDK's whole path but the network). Each
loads its own copy of Gemma 3 270M, and the same streaming completion (``max_tokens`` 64,
temperature 0, so the same tokens every time) goes to one then the other, over loopback
HTTP, in alternating rounds, so load from other processes hits both alike. The issue's
budget: at most 3 % fewer tokens/s with both on.

    python bench/observability.py [--rounds 20] [--observe both|traces|metrics|none] [--json]

Tokens/s of a request: completion tokens over the time from sending it to its last byte.
Each side's figure is the median over rounds; the ratio is on/off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

BUDGET = 0.97
MODEL = "gemma-3-270m"
BODY = {"model": MODEL, "prompt": "The history of the printing press", "max_tokens": 64,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
TRACED = ['exporters.otel.exporter="none"', "exporters.otel.sampling_ratio=1.0"]
METERED = ["exporters.prometheus.enabled=true"]


def kernel(data: Path, sets: list[str]) -> Any:
    from inferno.kernel import Kernel

    return Kernel.from_profile("edge", sets=[f'kernel.data_dir="{data}"', "protocols.http.port=0",
                                             "plugins.models.watch_interval=0", *sets])


def observed(data: Path, observe: str) -> tuple[Any, str]:
    """The "on" kernel, and what it observes: ``observe`` ("both", "traces", "metrics"); both
    falls back to traces alone when the prometheus exporter does not load."""
    from inferno.kernel import ConfigError

    if observe == "none":  # both sides alike: the noise of this machine
        return kernel(data, []).configure(), "nothing (A/A)"
    if observe == "traces":
        return kernel(data, TRACED).configure(), "traces"
    if observe == "metrics":
        return kernel(data, METERED).configure(), "metrics"
    try:
        return kernel(data, [*TRACED, *METERED]).configure(), "metrics and traces"
    except (ConfigError, ImportError, LookupError) as exc:
        print(f"the prometheus exporter is not available ({type(exc).__name__}); "
              f"measuring traces alone")
        return kernel(data, TRACED).configure(), "traces"


def export_to_devnull(on: Any) -> None:
    if "otel" not in on.drivers("exporters"):
        return
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    sink = open(os.devnull, "w")  # noqa: SIM115 - open while the kernel runs
    driver = on.drivers("exporters")["otel"]
    driver.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sink)))


async def stream(session: Any, url: str) -> float:
    """Tokens/s of one streamed completion."""
    started = time.perf_counter()
    tokens = 0
    async with session.post(url, json=BODY) as response:
        response.raise_for_status()
        async for line in response.content:
            text = line.decode().strip()
            if text.startswith("data: {"):
                usage = json.loads(text[6:]).get("usage")
                if usage:
                    tokens = int(usage["completion_tokens"])
    elapsed = time.perf_counter() - started
    if not tokens:
        raise RuntimeError("the stream reported no usage")
    return tokens / elapsed


async def measure(rounds: int, observe: str) -> dict[str, Any]:
    import aiohttp

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        off = kernel(root / "off", [])
        on, observing = observed(root / "on", observe)
        async with off.running(), on.running(), aiohttp.ClientSession() as session:
            export_to_devnull(on)
            urls = {name: k.drivers("protocols")["http"].url + "/v1/completions"
                    for name, k in (("off", off), ("on", on))}
            for url in urls.values():  # load both models and warm their caches
                await stream(session, url)
            rates: dict[str, list[float]] = {"off": [], "on": []}
            for index in range(rounds):
                order = ("off", "on") if index % 2 else ("on", "off")
                for name in order:
                    rates[name].append(await stream(session, urls[name]))
    off_rate, on_rate = (statistics.median(rates[name]) for name in ("off", "on"))
    return {"observing": observing, "rounds": rounds, "tokens_per_second_off": off_rate,
            "tokens_per_second_on": on_rate, "ratio": on_rate / off_rate,
            "budget": BUDGET, "within_budget": on_rate / off_rate >= BUDGET}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--observe", choices=("both", "traces", "metrics", "none"), default="both",
                        help="what the observed kernel has on (both: the issue's budget; none: "
                             "an A/A run that shows this machine's noise)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    from inferno.kernel.logs import configure_logging

    configure_logging("console", "warning")
    result = asyncio.run(measure(args.rounds, args.observe))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['observing']} on vs off, {result['rounds']} rounds, "
          f"{MODEL} streaming {BODY['max_tokens']} tokens")
    print(f"  off  {result['tokens_per_second_off']:8.1f} tokens/s")
    print(f"  on   {result['tokens_per_second_on']:8.1f} tokens/s")
    print(f"  ratio {result['ratio']:.3f} (budget >= {BUDGET}: "
          f"{'met' if result['within_budget'] else 'NOT met'})")


if __name__ == "__main__":
    main()
