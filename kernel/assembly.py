"""Turning a profile into a set of registered, configured plugins.

Two passes: the layers are merged once to learn which plugins the profile
names; those plugins are loaded and registered; their declared defaults then
become the lowest layer of the final merge, which is validated as a whole.
Every problem found on the way is collected and raised together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy
import structlog

from . import loader
from .config import (
    PLUGINS_RESERVED,
    ConfigSpec,
    Layers,
    Settings,
    deep_merge,
    kernel_spec_defaults,
    load_settings,
    nest,
)
from .contracts import HOOK_PLUGIN_GROUP, KINDS, KINDS_BY_SECTION, Driver
from .errors import ConfigProblem, InfernoError
from .logs import get_logger
from .validation import KERNEL_VALIDATORS, raise_problems, validate


@dataclass
class Assembly:
    """The outcome of configuration: a plugin manager and everything registered in it."""

    manager: pluggy.PluginManager
    settings: Settings
    specs: dict[str, ConfigSpec]
    drivers: dict[str, dict[str, type[Driver]]]  # kind section → name → class, profile order
    hook_plugins: dict[str, Any]
    catalog: loader.Catalog
    skipped: dict[str, str] = field(default_factory=dict)
    #: Hook plugins that own a top-level section (``ConfigSpec.section``): name → section.
    sections: dict[str, str] = field(default_factory=dict)

    def plugin_path(self, name: str) -> str:
        if name in self.sections:
            return self.sections[name]
        for section, named in self.drivers.items():
            if name in named:
                return f"{section}.{name}"
        return f"plugins.{name}"

    def secret_paths(self) -> frozenset[str]:
        return frozenset(f"{path}.{key}" for path, spec in self.specs.items()
                         for key in spec.secrets)


def enabled_drivers(settings: Settings) -> tuple[dict[str, list[str]], list[ConfigProblem]]:
    """Drivers the profile names: every table under a kind section without ``enabled = false``."""
    enabled: dict[str, list[str]] = {}
    problems: list[ConfigProblem] = []
    for kind in KINDS:
        tables = settings.data.get(kind.section, {})
        if not isinstance(tables, Mapping):
            problems.append(ConfigProblem(kind.section, "must be a table of plugin tables",
                                          settings.source(kind.section)))
            continue
        for name, table in tables.items():
            if not isinstance(table, Mapping):
                problems.append(ConfigProblem(
                    f"{kind.section}.{name}", f"must be a table ([{kind.section}.{name}])",
                    settings.source(f"{kind.section}.{name}")))
            elif not isinstance(table.get("enabled", True), bool):
                problems.append(ConfigProblem(
                    f"{kind.section}.{name}.enabled",
                    f"must be true or false, got {table['enabled']!r}",
                    settings.source(f"{kind.section}.{name}.enabled")))
            elif table.get("enabled", True):
                enabled.setdefault(kind.section, []).append(name)
    return enabled, problems


def assemble(layers: Layers, extra_plugins: Mapping[str, Any] | None = None,
             log: structlog.typing.FilteringBoundLogger | None = None) -> Assembly:
    """Load, register and configure every plugin the layers ask for, or raise every problem."""
    log = log or get_logger("kernel")
    extra = dict(extra_plugins or {})
    first = load_settings(layers, defaults={})
    plugin_table = first.data.get("plugins", {})
    blocked = list(plugin_table.get("block", [])) if isinstance(plugin_table, Mapping) else []
    allowed = list(plugin_table.get("allow", [])) if isinstance(plugin_table, Mapping) else []
    configured = [name for name, value in plugin_table.items()
                  if isinstance(value, Mapping)] if isinstance(plugin_table, Mapping) else []
    enabled, problems = enabled_drivers(first)

    manager = loader.make_plugin_manager(blocked, log)
    catalog = loader.discover()
    assembly = Assembly(manager, first, {}, {}, {}, catalog)

    def fail(path: str, reason: str) -> None:
        problems.append(ConfigProblem(path, reason, first.source(path)))

    _load_hook_plugins(assembly, extra, allowed=allowed, named=configured, blocked=blocked,
                       fail=fail, log=log)
    _load_drivers(assembly, extra, enabled=enabled, blocked=blocked, fail=fail)
    try:
        manager.hook.inferno_add_hookspecs.call_historic(kwargs={"plugin_manager": manager})
    except pluggy.PluginValidationError as exc:
        name = manager.get_name(exc.plugin) or "?"
        fail(assembly.plugin_path(name), f"does not match a hook spec a plugin added: {exc}")
    for name, hook_name in loader.async_hooks(manager):
        fail(assembly.plugin_path(name), f"{hook_name} is async; hooks are synchronous "
                                         f"(return an async context manager from "
                                         f"inferno_lifespan for async work)")
    unknown = loader.unknown_hooks(manager)
    for name, hook_name in unknown:
        fail(assembly.plugin_path(name), f"implements {hook_name!r}, which is no hook "
                                         f"(misspelled? see docs/hooks.md)")
    if not unknown:
        manager.check_pending()  # pluggy's own check, as a backstop to the list above

    specs, owners, defaults = _collect_specs(assembly, fail)
    settings = load_settings(layers, defaults=defaults, owners=owners)
    assembly.settings, assembly.specs = settings, specs
    extra_keys = {f"{section}.{name}": frozenset({"enabled"})
                  for section, names in assembly.drivers.items() for name in names}
    extra_keys["plugins"] = frozenset(PLUGINS_RESERVED | set(catalog.names(HOOK_PLUGIN_GROUP))
                                      | set(assembly.hook_plugins))
    broken = {p.key for p in problems}  # sections of plugins that failed are not checked again
    problems += [p for p in validate(settings, specs, extra_keys)
                 if not any(p.key.startswith(b + ".") for b in broken)]
    raise_problems(_unique(problems))
    return assembly


def _collect_specs(assembly: Assembly, fail: Any
                   ) -> tuple[dict[str, ConfigSpec], dict[str, str], dict[str, Any]]:
    """Every section's spec, which plugin owns it, and the plugins' defaults, nested."""
    specs = {section: ConfigSpec(defaults=defaults, validators=KERNEL_VALIDATORS.get(section, ()))
             for section, defaults in kernel_spec_defaults().items()}
    owners: dict[str, str] = {}
    defaults: dict[str, Any] = {}
    for name in [*assembly.hook_plugins, *(n for d in assembly.drivers.values() for n in d)]:
        path = assembly.plugin_path(name)
        try:
            spec = loader.call_for(assembly.manager, name, "inferno_config_spec") or ConfigSpec()
        except Exception as exc:  # a plugin's bug, reported like any config problem
            fail(path, f"inferno_config_spec failed: {type(exc).__name__}: {exc}")
            continue
        if not isinstance(spec, ConfigSpec):
            fail(path, f"inferno_config_spec must return a ConfigSpec or None, "
                       f"got {type(spec).__name__}")
            continue
        if spec.section is not None:
            if not _claim_section(assembly, name, spec.section, specs):
                fail(path, f"ConfigSpec.section {spec.section!r} is not a free top-level "
                           f"section a hook plugin may own")
                continue
            path = spec.section
        specs[path] = spec
        owners[path] = name
        defaults = deep_merge(defaults, nest(path, dict(spec.defaults)))
    return specs, owners, defaults


def _claim_section(assembly: Assembly, name: str, section: str,
                   specs: Mapping[str, ConfigSpec]) -> bool:
    """Let hook plugin ``name`` own top-level ``section``, if it is free."""
    if name not in assembly.hook_plugins or not section.isidentifier() \
            or section in {*specs, *KINDS_BY_SECTION, "plugins"}:
        return False
    assembly.sections[name] = section
    return True


def _load_hook_plugins(assembly: Assembly, extra: Mapping[str, Any], *, allowed: list[str],
                       named: list[str], blocked: list[str], fail: Any,
                       log: structlog.typing.FilteringBoundLogger) -> None:
    installed = assembly.catalog.names(HOOK_PLUGIN_GROUP)
    wanted = allowed or [n for n in installed if n not in blocked]
    extra_hooks = {n: o for n, o in extra.items() if not _is_driver(o)}
    to_load = [n for n in wanted if n not in extra_hooks]
    for name in to_load:
        try:
            assembly.catalog.check(HOOK_PLUGIN_GROUP, name)
        except InfernoError as exc:
            fail(f"plugins.{name}", str(exc))
    result = loader.load(HOOK_PLUGIN_GROUP, to_load)
    for name, reason in result.failed.items():
        if name in allowed:
            fail("plugins.allow", f"plugin {name!r}: {reason}")
        elif name in named:  # the profile configures it, so it asked for it
            fail(f"plugins.{name}", reason)
        else:  # only discovered, not asked for: skip it and say so
            assembly.skipped[name] = reason
            log.warning("skipping plugin that failed to load", name=name, reason=reason)
    for name, obj in {**result.loaded, **extra_hooks}.items():
        if loader.register(assembly.manager, name, obj,
                           lambda n, why: fail(f"plugins.{n}", f"cannot register: {why}")):
            assembly.hook_plugins[name] = obj


def _load_drivers(assembly: Assembly, extra: Mapping[str, Any], *,
                  enabled: Mapping[str, list[str]], blocked: list[str], fail: Any) -> None:
    for kind in KINDS:
        names = enabled.get(kind.section, [])
        for name in names:
            if name in blocked:
                fail(f"{kind.section}.{name}", "is enabled here but blocked by [plugins] block")
        wanted = [n for n in names if n not in blocked and n not in extra]
        for name in wanted:
            try:
                assembly.catalog.check(kind.group, name)
            except InfernoError as exc:
                fail(f"{kind.section}.{name}", str(exc))
        result = loader.load(kind.group, wanted)
        for name, reason in result.failed.items():
            installed = ", ".join(assembly.catalog.names(kind.group)) or "none"
            hint = f" (installed {kind.section}: {installed})" if "no plugin" in reason else ""
            fail(f"{kind.section}.{name}", reason + hint)
        found = {**result.loaded, **{n: extra[n] for n in names if n in extra}}
        for name in names:  # keep the profile's order
            if name not in found:
                continue
            why = loader.check_driver(kind.section, name, found[name])
            if why:
                fail(f"{kind.section}.{name}", why)
                continue
            section = kind.section

            def cannot_register(plugin: str, why: str, section: str = section) -> None:
                fail(f"{section}.{plugin}", f"cannot register: {why}")

            if loader.register(assembly.manager, name, found[name], cannot_register):
                assembly.drivers.setdefault(kind.section, {})[name] = found[name]


def _is_driver(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Driver) and obj.kind in KINDS_BY_SECTION


def _unique(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for problem in problems:
        if (problem.key, problem.message) not in seen:
            seen.add((problem.key, problem.message))
            unique.append(problem)
    return unique
