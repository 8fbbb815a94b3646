"""pytest fixtures for plugin authors, registered through the ``pytest11`` entry point.

``make_kernel`` builds a kernel from a profile given as a dict, with plugins
registered for one test and the data directory in the test's temporary folder::

    def test_my_exporter(make_kernel, run_kernel):
        kernel = make_kernel({"exporters": {"mine": {"path": "out.jsonl"}}},
                             plugins={"mine": MyExporter})
        run_kernel(kernel, lambda k: k.drivers("exporters")["mine"].flush())
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .config import Layers, profile_chain, profiles_dir
from .kernel import Kernel

T = TypeVar("T")
KernelFactory = Callable[..., Kernel]


@pytest.fixture
def inferno_data_dir(tmp_path: Path) -> Path:
    """The data directory kernels built by ``make_kernel`` use."""
    path = tmp_path / "inferno-data"
    path.mkdir()
    return path


@pytest.fixture
def make_kernel(inferno_data_dir: Path) -> KernelFactory:
    """Build a configured kernel: ``make_kernel(profile_dict, plugins={...}, base="edge")``.

    ``profile_dict`` is layered over ``base`` (a shipped profile name or path;
    ``None`` for ``base.toml`` alone). ``plugins`` maps names to driver classes or
    hook modules registered for this kernel only. ``configure=False`` returns it
    unconfigured, to test configuration errors.
    """

    def make(profile: Mapping[str, Any] | None = None, *,
             plugins: Mapping[str, Any] | None = None, base: str | None = None,
             sets: Sequence[str] = (), configure: bool = True) -> Kernel:
        files = profile_chain(base) if base else [profiles_dir() / "base.toml"]
        data_dir = f"kernel.data_dir={json.dumps(str(inferno_data_dir))}"
        kernel = Kernel(Layers(files=files, sets=(data_dir, *sets), overrides=profile),
                        plugins=plugins)
        return kernel.configure() if configure else kernel

    return make


@pytest.fixture
def run_kernel() -> Callable[[Kernel, Callable[[Kernel], Awaitable[T]]], T]:
    """Start ``kernel``, await ``scenario(kernel)``, stop it, and return the result."""

    def run(kernel: Kernel, scenario: Callable[[Kernel], Awaitable[T]]) -> T:
        async def main() -> T:
            async with kernel.running():
                return await scenario(kernel)
        return asyncio.run(main())

    return run
