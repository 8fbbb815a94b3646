"""What the machine has, for backends choosing thread counts."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyper-threads counted once).

    llama.cpp and onnxruntime run fastest with one thread per physical core; a
    second thread on a core's sibling mostly waits for the same execution units.
    """
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores: set[str] = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(allowed) or os.cpu_count() or 1
        cores.add(f"{package}:{core}")
    return len(cores) or os.cpu_count() or 1


def threads(configured: int) -> int:
    """``configured`` threads, or the physical cores when it is 0."""
    return configured if configured > 0 else physical_cores()
