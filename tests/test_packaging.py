"""Packaging: a wheel and an editable install each give ``inferno.kernel`` and
``inferno.plugins`` and never a bare top-level ``kernel`` or ``plugins``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

IMPORTS = """
import importlib.util, json, inferno.kernel, inferno.plugins, inferno.profiles
print(json.dumps({
    "kernel": inferno.kernel.__file__,
    "bare_kernel": importlib.util.find_spec("kernel") is not None,
    "bare_plugins": importlib.util.find_spec("plugins") is not None,
    "bare_profiles": importlib.util.find_spec("profiles") is not None,
}))
"""


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=600, check=False)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(path)
    return path / "bin"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", out, REPO, cwd=out)
    (built,) = out.glob("inferno-*.whl")
    return built


def test_wheel_holds_only_the_inferno_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"inferno", "inferno-0.1.0.dist-info"}
    assert "inferno/kernel/kernel.py" in names
    assert "inferno/kernel/py.typed" in names
    assert "inferno/plugins/exporters/log.py" in names
    assert {"inferno/profiles/base.toml", "inferno/profiles/edge.toml",
            "inferno/profiles/enterprise.toml"} <= set(names)
    assert not any(name.startswith(("kernel/", "plugins/", "profiles/", "tests/"))
                   for name in names)


def test_plain_install_in_a_fresh_venv_lists_builtins_and_the_template(wheel, tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv")
    run(bin_dir / "pip", "install", "-q", wheel, cwd=tmp_path)
    imports = json.loads(run(bin_dir / "python", "-c", IMPORTS, cwd=tmp_path).stdout)
    assert "site-packages/inferno/kernel" in imports["kernel"]
    assert not imports["bare_kernel"]
    assert not imports["bare_plugins"]
    assert not imports["bare_profiles"]
    env = {"INFERNO_KERNEL__DATA_DIR": str(tmp_path / "data")}
    listing = run(bin_dir / "inferno", "plugins", "list", cwd=tmp_path, env=env).stdout
    assert "log" in listing
    assert "eventfile" not in listing
    # The shipped profiles serve models, so they ask for the backends' extras by name.
    refused = subprocess.run([bin_dir / "inferno", "profile", "validate", "edge"], cwd=tmp_path,
                             env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=60, check=False)
    assert refused.returncode == 1
    assert "backends.gguf" in refused.stderr
    assert "pip install 'inferno[gguf]'" in refused.stderr

    run(bin_dir / "pip", "install", "-q", REPO / "contrib" / "plugin-template", cwd=tmp_path)
    rows = json.loads(run(bin_dir / "inferno", "plugins", "list", "--json", cwd=tmp_path,
                          env=env).stdout)
    template = {row["name"]: row for row in rows}["eventfile"]
    assert template["kind"] == "exporters"
    assert template["distribution"] == "inferno-plugin-eventfile"
    assert template["enabled"] is False  # installed, but no profile names it yet
    profile = tmp_path / "events.toml"
    profile.write_text('extends = "base"\n[exporters.eventfile]\npath = "ev.jsonl"\n'
                       'topics = ["kernel.state"]\n')
    enabled = run(bin_dir / "inferno", "--profile", profile, "plugins", "list", "--json",
                  cwd=tmp_path, env=env).stdout
    assert {row["name"]: row for row in json.loads(enabled)}["eventfile"]["enabled"] is True

    # The profile enables and configures it, and the running kernel uses it.
    server = subprocess.Popen([bin_dir / "inferno", "--profile", profile], cwd=tmp_path,
                              env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    for line in server.stderr:
        if "ready" in line:
            break
    server.send_signal(signal.SIGTERM)
    assert server.wait(10) == 0
    written = tmp_path / "data" / "exporters" / "eventfile" / "ev.jsonl"
    states = [json.loads(line)["state"] for line in written.read_text().splitlines()]
    assert states == ["configured", "starting", "running", "stopping"]
    tail = run(bin_dir / "inferno", "events", "-n", "1", "--profile", profile, cwd=tmp_path,
               env=env).stdout
    assert json.loads(tail)["state"] == "stopping"


def test_the_template_passes_its_own_tests():
    template = REPO / "contrib" / "plugin-template"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(template / "tests")], cwd=template, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(template)},
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout


def test_editable_install_maps_the_folders_into_the_namespace(tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv")
    run(bin_dir / "pip", "install", "-q", "-e", REPO, cwd=tmp_path)
    imports = json.loads(run(bin_dir / "python", "-c", IMPORTS, cwd=tmp_path).stdout)
    assert imports["kernel"] == str(REPO / "kernel" / "__init__.py")
    assert not imports["bare_kernel"]
    assert not imports["bare_plugins"]
    env = {"INFERNO_KERNEL__DATA_DIR": str(tmp_path / "data")}
    run(bin_dir / "inferno", "profile", "validate", "base", cwd=tmp_path, env=env)
    assert "log" in run(bin_dir / "inferno", "plugins", "list", cwd=tmp_path, env=env).stdout


def test_plain_install_does_not_pull_the_heavy_backends():
    from importlib.metadata import requires
    runtime = [r for r in requires("inferno") or [] if "extra ==" not in r]
    heavy = ("llama-cpp-python", "onnxruntime", "tokenizers", "gguf", "torch")
    assert not [r for r in runtime if r.split(">")[0].split("=")[0].strip() in heavy]
    extras = {r.split("extra ==")[1].strip(" '\"") for r in requires("inferno") or []
              if "extra ==" in r}
    assert {"gguf", "onnx", "demo", "dev"} <= extras
