"""The docs describe the code as it is: hooks, config keys, the quick start and CI."""

from __future__ import annotations

import inspect
import re
import tomllib

import pytest

from inferno.kernel import hookspecs
from inferno.kernel.config import profiles_dir
from inferno.kernel.loader import call_for, discover, load, make_plugin_manager

from .conftest import REPO

HOOKS = [obj for name, obj in vars(hookspecs).items()
         if name.startswith("inferno_") and callable(obj)]


def def_line(function) -> str:
    """The spec's ``def`` line as written in the source, joined onto one line."""
    source = inspect.getsource(function)
    header = source[source.index("def "):source.index(":\n", source.index(") ->")) + 1]
    return re.sub(r"\s+", " ", header).replace("( ", "(").replace(" )", ")")


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.__name__)
def test_every_hook_is_documented_with_its_exact_signature(hook):
    docs = (REPO / "docs" / "hooks.md").read_text()
    assert f"### {hook.__name__}\n" in docs
    section = docs.split(f"### {hook.__name__}\n", 1)[1].split("\n### ", 1)[0]
    assert def_line(hook) in section, f"docs/hooks.md lacks: {def_line(hook)}"


def test_hooks_md_documents_no_hook_that_does_not_exist():
    docs = (REPO / "docs" / "hooks.md").read_text()
    documented = set(re.findall(r"^### (inferno_\w+)$", docs, flags=re.MULTILINE))
    assert documented == {hook.__name__ for hook in HOOKS}


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def builtin_plugin_keys() -> list[str]:
    keys = []
    for entry in discover().all():
        if entry.distribution != "inferno":
            continue
        obj = load(entry.group, [entry.name]).loaded[entry.name]
        manager = make_plugin_manager()
        manager.register(obj, entry.name)
        spec = call_for(manager, entry.name, "inferno_config_spec")
        prefix = spec.section if spec and spec.section else entry.config_path
        keys += leaf_keys(dict(spec.defaults), f"{prefix}.") if spec else []
    return keys


def test_every_config_key_is_documented():
    docs = (REPO / "docs" / "configuration.md").read_text()
    base = tomllib.loads((profiles_dir() / "base.toml").read_text())
    keys = leaf_keys(base) + builtin_plugin_keys()
    assert "exporters.log.level" in keys
    missing = [key for key in keys if f"`{key}`" not in docs]
    assert not missing, f"docs/configuration.md does not document: {missing}"


def quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert block, "the quick start has no bash block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    run, test = quick_start_commands()
    assert "inferno --profile edge" in run
    assert "pytest" in test
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci, ".ci/run must run the README's test command verbatim"


def test_readme_links_point_at_files_that_exist():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to missing {target}"
