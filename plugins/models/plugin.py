"""The ``models`` hook plugin: the model manager, its settings and its commands.

Settings live under ``[plugins.models]``; each model is a table
``[plugins.models.entries.NAME]``. While the kernel runs, other plugins reach
the manager with ``kernel.service("models")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import click
from dynaconf import Validator

from inferno.kernel import ConfigError, ConfigProblem, ConfigSpec, KernelHandle, hookimpl
from inferno.kernel.logs import get_logger

from .errors import ModelError
from .events import ModelDiscovered
from .manager import ModelManager
from .registry import Entry, PackagePaths, Registry, entry_from_table, scan, table_problems

DEFAULTS: dict[str, Any] = {
    # Folders scanned recursively for model files (named after the file).
    "directories": [],
    # The manifest `inferno models add` writes; "" means models.toml in the data directory.
    "manifest": "",
    # Models by name: {path, backend, format, parameters, chat_template, system_prompt,
    # aliases, sha256, options, keep_alive, preload, description}.
    "entries": {},
    # Names to load at start (as well as entries with preload = true).
    "preload": [],
    # Seconds an idle model stays loaded; 0 unloads after each request, -1 keeps it forever.
    "keep_alive": 300.0,
    # Most models loaded at once; 0 means only memory limits it.
    "max_loaded": 0,
    # Memory for loaded models ("8GiB"); "auto" means the kernel's memory budget.
    "memory": "auto",
    # Seconds between checks of loaded models' files for a new version; 0 turns hot swap off.
    "watch_interval": 2.0,
}


def _amount(value: Any) -> bool:
    if value == "auto":
        return True
    try:
        from inferno.kernel.resources import parse_amount

        return parse_amount(value) > 0
    except ValueError:
        return False


@hookimpl
def inferno_config_spec() -> ConfigSpec:
    return ConfigSpec(defaults=DEFAULTS, validators=[
        Validator("max_loaded", gte=0),
        Validator("watch_interval", gte=0),
        Validator("keep_alive", gte=-1),
        Validator("memory", condition=_amount,
                  messages={"condition": "memory must be 'auto' or an amount like '8GiB', "
                                         "got {value!r}"}),
    ])


@hookimpl
def inferno_configure(config: Mapping[str, Any]) -> None:
    """Check the profile's model entries with the rest of the configuration, so that a
    typo is reported by ``profile validate`` and at start, not found out at the first use."""
    problems = [ConfigProblem(f"plugins.models.entries.{name}" + (f".{key}" if key else ""),
                              problem)
                for name, table in config["entries"].items()
                for key, problem in table_problems(name, table)]
    if problems:
        raise ConfigError(problems)


@hookimpl
def inferno_lifespan(kernel: KernelHandle) -> AbstractAsyncContextManager[None]:
    return _serve_models(kernel)


@hookimpl
def inferno_cli_commands() -> Sequence[click.Command]:
    from . import cli, cli_tools

    return [*cli.COMMANDS, *cli_tools.COMMANDS]


def manifest_path(kernel: KernelHandle, config: Mapping[str, Any]) -> Path:
    configured = str(config["manifest"])
    if configured:
        return Path(configured).expanduser()
    return kernel.plugin_data_dir("plugins", "models") / "models.toml"


def build_registry(kernel: KernelHandle, config: Mapping[str, Any]) -> Registry:
    """Every model the profile, the manifest and the scanned folders name."""
    log = get_logger("models")
    registry = Registry()
    paths = PackagePaths(kernel.plugin_data_dir("plugins", "models") / "packages.json")
    for name, table in config["entries"].items():
        _add(registry, name, table, "profile", paths)
    manifest = manifest_path(kernel, config)
    if manifest.is_file():
        try:
            tables = tomllib.loads(manifest.read_text()).get("models", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ModelError(manifest, f"cannot read the manifest: {exc}") from None
        for name, table in tables.items():
            _add(registry, name, table, str(manifest), paths, base=manifest.parent)
    known = {e.path for e in registry.entries.values() if e.path}
    for name, path, format_ in scan(Path(d).expanduser() for d in config["directories"]):
        if path not in known:
            registry.add(Entry(name=name, path=path, source=f"folder {path.parent}",
                               format=format_))
    for problem in registry.problems:
        log.warning("model not registered", problem=problem)
    for entry in registry.entries.values():
        if entry.unavailable:
            log.info("model unavailable", model=entry.name, reason=entry.unavailable)
        kernel.bus.publish(ModelDiscovered(model=entry.name, path=str(entry.path or ""),
                                           source=entry.source))
    return registry


def _add(registry: Registry, name: str, table: Any, source: str, paths: PackagePaths, *,
         base: Path | None = None) -> None:
    if not isinstance(table, Mapping):
        registry.problems.append(f"{name}: its entry must be a table ({source})")
        return
    try:
        registry.add(entry_from_table(name, table, source, paths, base))
    except ModelError as exc:
        registry.problems.append(str(exc))


@asynccontextmanager
async def _serve_models(kernel: KernelHandle) -> AsyncIterator[None]:
    config = kernel.config["plugins"]["models"]
    log = get_logger("models")
    manager = ModelManager(kernel, config, build_registry(kernel, config), log)
    kernel.provide("models", manager)
    remove_evictor = kernel.resources.add_evictor(manager.evict)
    watcher = None
    if float(config["watch_interval"]) > 0:
        watcher = asyncio.ensure_future(_watch(manager, float(config["watch_interval"])))
    preload = [*config["preload"], *(n for n, e in manager.registry.entries.items() if e.preload)]
    for name in dict.fromkeys(preload):
        try:
            await manager.preload(name)
        except ModelError as exc:  # reported as model.failed; the other models still serve
            log.error("preload failed", model=name, error=exc.reason)
            manager.preload_failures[name] = exc.reason  # readiness checks report it
    try:
        yield
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        remove_evictor()
        await manager.close()


async def _watch(manager: ModelManager, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await manager.check_files()
        except Exception as exc:  # a bad check must not end hot swap for good
            manager.log.error("checking model files failed", error=str(exc))
