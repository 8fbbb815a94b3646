"""Finding plugins by entry point (importlib.metadata), loading them by name
(stevedore), and the pluggy manager they register with.

Built-in plugins are entry points of the ``inferno`` distribution in the same
groups third parties use, so both are found, listed and loaded the same way.
The entry-point name is the name a profile uses and the name registered with
pluggy.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy
import structlog
from stevedore import NamedExtensionManager

from . import hookspecs
from .contracts import HOOK_PLUGIN_GROUP, KINDS, KINDS_BY_SECTION, Driver
from .errors import PluginConflict

#: Entry-point group → the section that names its plugins in a profile.
GROUPS: Mapping[str, str] = {HOOK_PLUGIN_GROUP: "plugins", **{k.group: k.section for k in KINDS}}


@dataclass(frozen=True)
class PluginEntry:
    """A plugin as installed: found, not yet imported."""

    name: str
    group: str
    value: str
    distribution: str
    version: str

    @property
    def section(self) -> str:
        return GROUPS[self.group]

    @property
    def config_path(self) -> str:
        return f"{self.section}.{self.name}"


@dataclass
class Catalog:
    """Every installed plugin, by group and name, and the names claimed twice."""

    entries: dict[str, dict[str, PluginEntry]] = field(default_factory=dict)
    conflicts: dict[tuple[str, str], list[PluginEntry]] = field(default_factory=dict)

    def get(self, group: str, name: str) -> PluginEntry | None:
        return self.entries.get(group, {}).get(name)

    def names(self, group: str) -> list[str]:
        return sorted(self.entries.get(group, {}))

    def all(self) -> list[PluginEntry]:
        return [entry for group in self.entries.values() for entry in group.values()]

    def check(self, group: str, name: str) -> None:
        claims = self.conflicts.get((group, name))
        if claims:
            who = " and ".join(f"{c.distribution} {c.version} ({c.value})" for c in claims)
            raise PluginConflict(
                f"plugin name {name!r} in {group} is claimed by {who}; uninstall one of them")


def discover() -> Catalog:
    """Read the entry points of every installed distribution (nothing is imported)."""
    catalog = Catalog()
    seen_dists: set[str] = set()
    for dist in importlib.metadata.distributions():
        dist_name = (dist.metadata["Name"] or "?").lower().replace("_", "-")
        if dist_name in seen_dists:  # the same distribution twice on sys.path: first wins
            continue
        seen_dists.add(dist_name)
        for ep in dist.entry_points:
            if ep.group not in GROUPS:
                continue
            entry = PluginEntry(ep.name, ep.group, ep.value, dist_name, dist.version)
            group = catalog.entries.setdefault(ep.group, {})
            if ep.name in group:
                claims = catalog.conflicts.setdefault((ep.group, ep.name), [group[ep.name]])
                claims.append(entry)
            else:
                group[ep.name] = entry
    return catalog


# --------------------------------------------------------------------------- pluggy


class InfernoPluginManager(pluggy.PluginManager):
    """pluggy's manager, treating every ``inferno_*`` routine as a hook implementation,
    marked or not, so that a misspelled hook name fails ``check_pending()``."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> pluggy.HookimplOpts | None:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("inferno_"):
            method = getattr(plugin, name, None)
            if callable(method):
                return {"wrapper": False, "hookwrapper": False, "optionalhook": False,
                        "tryfirst": False, "trylast": False, "specname": None}
        return opts


def make_plugin_manager(blocked: Iterable[str] = (),
                        log: structlog.typing.FilteringBoundLogger | None = None
                        ) -> InfernoPluginManager:
    """A fresh manager with the kernel's hook specs; tracing when ``INFERNO_TRACE_HOOKS=1``."""
    manager = InfernoPluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for name in blocked:
        manager.set_blocked(name)
    if os.environ.get("INFERNO_TRACE_HOOKS", "") not in ("", "0"):
        _trace(manager, log or structlog.get_logger("inferno.hooks"))
    return manager


def _trace(manager: pluggy.PluginManager, log: structlog.typing.FilteringBoundLogger) -> None:
    started: list[float] = []

    def before(hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
               ) -> None:
        started.append(time.perf_counter())

    def after(outcome: Any, hook_name: str, impls: Sequence[pluggy.HookImpl],
              kwargs: Mapping[str, Any]) -> None:
        elapsed = time.perf_counter() - started.pop()
        log.info("hook call", hook=hook_name, plugins=[i.plugin_name for i in impls],
                 ms=round(elapsed * 1000, 3), error=outcome.exception is not None)

    manager.add_hookcall_monitoring(before, after)


def _implementations(manager: pluggy.PluginManager
                     ) -> Iterator[tuple[str, pluggy.HookCaller, pluggy.HookImpl]]:
    """Every (plugin name, hook, implementation) of the registered, unblocked plugins."""
    for name, plugin in manager.list_name_plugin():
        if plugin is None:  # blocked
            continue
        for caller in manager.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin_name == name:
                    yield name, caller, impl


def async_hooks(manager: pluggy.PluginManager) -> list[tuple[str, str]]:
    """Every (plugin, hook name) implemented with ``async def``: pluggy would never await it."""
    return [(name, caller.name) for name, caller, impl in _implementations(manager)
            if inspect.iscoroutinefunction(impl.function)]


def unknown_hooks(manager: pluggy.PluginManager) -> list[tuple[str, str]]:
    """Every (plugin, hook name) implemented without a spec: what ``check_pending()``
    raises for, all of them rather than the first."""
    return [(name, caller.name) for name, caller, _ in _implementations(manager)
            if not caller.has_spec()]


def call_for(manager: pluggy.PluginManager, plugin_name: str, hook_name: str,
             **kwargs: Any) -> Any:
    """Call one plugin's implementation of a hook (``None`` when it has none)."""
    caller: pluggy.HookCaller = getattr(manager.hook, hook_name)
    if not any(impl.plugin_name == plugin_name for impl in caller.get_hookimpls()):
        return None
    others = [p for name, p in manager.list_name_plugin() if name != plugin_name]
    results = manager.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)
    return results[0] if results else None


# --------------------------------------------------------------------------- loading


@dataclass
class LoadResult:
    """What a load produced: objects by name, and failures by name."""

    loaded: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def load(group: str, names: Sequence[str]) -> LoadResult:
    """Import the named entry points of ``group`` with stevedore, collecting every failure."""
    result = LoadResult()
    if not names:
        return result

    def failed(_: Any, entry_point: importlib.metadata.EntryPoint, exc: BaseException) -> None:
        result.failed[entry_point.name] = f"cannot import {entry_point.value}: " \
                                          f"{type(exc).__name__}: {exc}"

    def missing(missing_names: Iterable[str]) -> None:
        for name in missing_names:
            result.failed.setdefault(name, f"no plugin named {name!r} is installed in {group}")

    extensions: NamedExtensionManager[Any] = NamedExtensionManager(
        group, names=list(names), invoke_on_load=False, name_order=True,
        on_load_failure_callback=failed, on_missing_entrypoints_callback=missing,
    )
    for extension in extensions:
        result.loaded[extension.name] = extension.plugin
    return result


def check_driver(section: str, name: str, obj: Any) -> str | None:
    """Why ``obj`` cannot be a driver of this kind, or ``None`` when it can."""
    contract = KINDS_BY_SECTION[section].contract
    if not (isinstance(obj, type) and issubclass(obj, Driver)):
        return f"entry point does not name a class (got {obj!r})"
    if not issubclass(obj, contract):
        return f"{obj.__module__}.{obj.__qualname__} is not a {contract.__name__}"
    abstract = sorted(getattr(obj, "__abstractmethods__", ()))
    if abstract:
        return f"{obj.__qualname__} does not implement {', '.join(abstract)}"
    for attribute in dir(obj):
        if attribute.startswith("inferno_") and inspect.isfunction(
                inspect.getattr_static(obj, attribute)):
            return (f"{obj.__qualname__}.{attribute} is a hook on a driver class: make it a "
                    f"@staticmethod or @classmethod (the kernel registers the class)")
    return None


def register(manager: pluggy.PluginManager, name: str, obj: Any,
             on_error: Callable[[str, str], None]) -> bool:
    """Register ``obj`` under ``name``; report a bad hook implementation through ``on_error``."""
    if manager.has_plugin(name):
        on_error(name, f"the name {name!r} is already taken by another plugin; plugin names "
                       f"must be unique across kinds (uninstall or block one of them)")
        return False
    try:
        manager.register(obj, name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        on_error(name, str(exc))
        return False
    return True


