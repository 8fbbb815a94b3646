"""The code stays what the style guide asks: lint-clean, strictly typed, a small kernel."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from .conftest import REPO


def test_kernel_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "kernel").glob("*.py")}
    assert {name: lines for name, lines in sizes.items() if lines > 400} == {}


def test_kernel_imports_nothing_from_plugins():
    for path in (REPO / "kernel").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("inferno.plugins", "plugins")), path.name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("inferno.plugins") for a in node.names), path


@pytest.mark.slow
def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)],
                            capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_strict_is_clean_on_the_kernel():
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "kernel"],
                            capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
