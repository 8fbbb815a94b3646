"""What authentication plus rate limiting costs a request, against the same route with both off.

Two edge kernels run in this process: "off" admits anonymous callers with rate limits
disabled; "on" admits only an API key (looked up in its SQLite store on every request) and
checks a memory rate limit (requests, tokens and calls at once). Requests to the two take
turns, so load from other processes hits both alike. The audit log is off in both; its cost
is measured on its own at the end (``--audit``), per fsync policy.

    python bench/security.py [--requests 3000] [--audit] [--json]

Figures:
  http     GET /v1/models over loopback HTTP with aiohttp: p50 and p90 per request, and the
           difference of the p50s (the issue's budget: under 200 µs).
  gateway  the same call straight through the gateway (no HTTP): p50 per call.
  audit    one audit record written, per fsync policy (with --audit).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

BUDGET_US = 200.0


def kernel(data: Path, sets: list[str]) -> Any:
    from inferno.kernel import Kernel

    return Kernel.from_profile("edge", sets=[f'kernel.data_dir="{data}"', "protocols.http.port=0",
                                             *sets])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def paired(count: int, off: Callable[[], Awaitable[Any]],
                 on: Callable[[], Awaitable[Any]]) -> tuple[list[float], list[float]]:
    """Microseconds per call of each side, the calls taking turns, after a warm-up."""
    offs: list[float] = []
    ons: list[float] = []
    for index in range(count + 200):
        turns = ((off, offs), (on, ons)) if index % 2 else ((on, ons), (off, offs))
        for work, sink in turns:
            started = time.perf_counter()
            await work()
            if index >= 200:
                sink.append((time.perf_counter() - started) * 1e6)
    return offs, ons


async def measure(count: int) -> dict[str, Any]:
    import aiohttp

    from inferno.kernel import Credentials
    from inferno.plugins.auth.keystore import KeyStore
    from inferno.plugins.gateway.calls import Call

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        store = KeyStore(root / "keys.sqlite")
        _, key = store.create("bench", roles=["user"])
        store.close()
        off = kernel(root / "off", ["rate_limits.enabled=false"])
        on = kernel(root / "on", [
            "auth.none.enabled=false", f'auth.api_key.store="{root / "keys.sqlite"}"',
            "rate_limits.requests_per_minute=1000000000",
            "rate_limits.tokens_per_minute=1000000000", "rate_limits.concurrent=1000"])
        async with off.running(), on.running(), aiohttp.ClientSession() as session:
            urls = [k.drivers("protocols")["http"].url + "/v1/models" for k in (off, on)]
            headers = {"Authorization": f"Bearer {key}"}

            async def get(url: str, send: dict[str, str]) -> None:
                async with session.get(url, headers=send) as response:
                    assert response.status == 200, await response.text()
                    await response.read()

            http = await paired(count, lambda: get(urls[0], {}), lambda: get(urls[1], headers))
            gateways = [k.service("gateway") for k in (off, on)]
            creds = [Credentials({}, "127.0.0.1"),
                     Credentials({"authorization": headers["Authorization"]}, "127.0.0.1")]
            direct = await paired(count * 3, lambda: gateways[0].run(Call("models.list",
                                                                          credentials=creds[0])),
                                  lambda: gateways[1].run(Call("models.list",
                                                               credentials=creds[1])))
    return {"requests": count, "http": summary(*http), "gateway": summary(*direct)}


def summary(off: list[float], on: list[float]) -> dict[str, float]:
    p50_off, p50_on = statistics.median(off), statistics.median(on)
    return {"off_p50_us": round(p50_off, 1), "on_p50_us": round(p50_on, 1),
            "off_p90_us": round(percentile(off, 0.9), 1),
            "on_p90_us": round(percentile(on, 0.9), 1),
            "added_p50_us": round(p50_on - p50_off, 1), "ratio_p50": round(p50_on / p50_off, 3)}


async def audit_cost(count: int) -> dict[str, float]:
    """Microseconds per audit record, per fsync policy."""
    from inferno.kernel import Kernel

    figures = {}
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    for policy in ("never", "interval", "always"):
        with tempfile.TemporaryDirectory() as folder:
            audit_kernel = Kernel.from_profile("edge", sets=[
                f'kernel.data_dir="{folder}"', "audit.enabled=true", f'audit.key="{key}"',
                f'audit.fsync="{policy}"'])
            async with audit_kernel.running(protocols=False):
                log = audit_kernel.service("audit")
                times = []
                for _ in range(count if policy != "always" else max(50, count // 20)):
                    started = time.perf_counter()
                    await log.record("bench.record", "ok", principal="key:bench",
                                     source="127.0.0.1", request_id="r", resource="minilm")
                    times.append((time.perf_counter() - started) * 1e6)
            figures[f"{policy}_p50_us"] = round(statistics.median(times), 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--audit", action="store_true", help="also time audit records")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    from inferno.kernel.logs import configure_logging

    configure_logging("console", "warning", {})
    result = asyncio.run(measure(args.requests))
    if args.audit:
        result["audit"] = asyncio.run(audit_cost(args.requests))
    result["within_budget"] = result["http"]["added_p50_us"] < BUDGET_US
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name in ("http", "gateway"):
        row = result[name]
        print(f"{name:8} off p50 {row['off_p50_us']:8.1f} µs   on p50 {row['on_p50_us']:8.1f} µs"
              f"   added {row['added_p50_us']:7.1f} µs   ratio {row['ratio_p50']:.3f}")
    if "audit" in result:
        print("audit   ", "   ".join(f"{k} {v} µs" for k, v in result["audit"].items()))
    print(f"added per request at p50 {'within' if result['within_budget'] else 'OVER'} "
          f"the {BUDGET_US:.0f} µs budget")


if __name__ == "__main__":
    main()
