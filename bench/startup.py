"""Start-to-ready time and resident memory of ``inferno --profile edge`` with no model.

Each run starts a real ``inferno`` process, waits for its ``ready`` log line,
reads its resident set size from /proc, then stops it with SIGTERM. The same
script first times a bare ``python -c pass`` as the baseline, so the figures
can be read as a ratio on whatever machine runs them.

    python bench/startup.py [--runs 7] [--profile edge] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INFERNO = Path(sys.executable).with_name("inferno")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def one_start(profile: str, data_dir: str) -> tuple[float, float]:
    env = {**os.environ, "INFERNO_KERNEL__DATA_DIR": data_dir, "INFERNO_LOGGING__FORMAT": "json"}
    started = time.perf_counter()
    proc = subprocess.Popen([str(INFERNO), "--profile", profile], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if '"event": "ready"' in line:
                ready = time.perf_counter() - started
                memory = rss_mb(proc.pid)
                break
        else:
            raise RuntimeError(f"inferno exited with {proc.wait()} before it was ready")
        proc.send_signal(signal.SIGTERM)
        if proc.wait(10) != 0:
            raise RuntimeError(f"inferno exited with {proc.returncode} after SIGTERM")
    finally:
        proc.kill()
    return ready, memory


def baseline() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--profile", default="edge")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        one_start(args.profile, data_dir)  # warm the file cache once
        python = [baseline() for _ in range(args.runs)]
        runs = [one_start(args.profile, data_dir) for _ in range(args.runs)]
    ready = [r for r, _ in runs]
    memory = [m for _, m in runs]
    result = {
        "profile": args.profile,
        "runs": args.runs,
        "python_startup_s": round(statistics.median(python), 3),
        "ready_s_median": round(statistics.median(ready), 3),
        "ready_s_max": round(max(ready), 3),
        "ready_over_python": round(statistics.median(ready) / statistics.median(python), 1),
        "rss_mb_median": round(statistics.median(memory), 1),
        "rss_mb_max": round(max(memory), 1),
        "targets": {"ready_s": 1.0, "rss_mb": 100},
    }
    result["meets_targets"] = result["ready_s_max"] < 1.0 and result["rss_mb_max"] < 100
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
