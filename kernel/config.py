"""Layered configuration on dynaconf.

Layers, lowest first: the defaults each plugin declares (``inferno_config_spec``)
→ ``profiles/base.toml`` → the profile and the profiles it ``extends`` → an
optional user file → ``INFERNO_SECTION__KEY`` environment variables →
``--set section.key=value``. Only the files named here are read: nothing is
discovered in the working directory or its parents.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dynaconf import Dynaconf, Validator
from dynaconf.utils.parse_conf import parse_conf_data

from .errors import ConfigError, ConfigProblem, ProfileNotFound
from .validation import KERNEL_SECTIONS

ENV_PREFIX = "INFERNO"
PROFILE_META_KEYS = ("extends", "description")
#: Variables that configure the command line, not a config key.
RESERVED_ENV = frozenset({"CONFIG", "PROFILE", "TRACE_HOOKS"})
#: Keys under ``[plugins]`` that are not plugin names.
PLUGINS_RESERVED = frozenset({"allow", "block"})
MASK = "********"
SECRET_KEY = re.compile(r"(^|_)(key|secret|password|passwd|token|credentials?|passphrase)$")
_DYNACONF_OPTIONS = {"LOAD_DOTENV"}


@dataclass(frozen=True)
class ConfigSpec:
    """A plugin's settings: defaults (which also fix each key's type) and validators.

    A key that has a validator is checked by it alone, not by its default's type.

    Keys are relative to the plugin's section. With ``strict`` a key that has no
    default is reported as unknown; a default of ``{}`` accepts any sub-keys.
    ``secrets`` names keys to mask beyond those that look secret by name.
    """

    defaults: Mapping[str, Any] = field(default_factory=dict)
    validators: Sequence[Validator] = ()
    secrets: frozenset[str] = frozenset()
    strict: bool = True


# --------------------------------------------------------------------------- profiles


def profiles_dir() -> Path:
    """The folder of the profiles shipped with Inferno."""
    return Path(str(resources.files("inferno.profiles")))


def shipped_profiles() -> dict[str, Path]:
    return {path.stem: path for path in sorted(profiles_dir().glob("*.toml"))}


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ProfileNotFound(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem("<file>", f"invalid TOML: {exc}", str(path))]) from exc


def profile_path(ref: str, relative_to: Path | None = None) -> Path:
    """``NAME`` is a shipped profile; anything with a slash or ``.toml`` is a path."""
    if "/" in ref or ref.endswith(".toml"):
        path = Path(ref).expanduser()
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        path = path.resolve()
        if not path.is_file():
            raise ProfileNotFound(f"profile file {ref!r} does not exist ({path})")
        return path
    shipped = shipped_profiles()
    if ref not in shipped:
        names = ", ".join(sorted(shipped))
        raise ProfileNotFound(f"no profile named {ref!r}; shipped profiles: {names}")
    return shipped[ref]


def profile_chain(ref: str) -> list[Path]:
    """The profile's files, most general first, following ``extends``."""
    chain: list[Path] = []
    path: Path | None = profile_path(ref)
    while path is not None:
        if path in chain:
            cycle = " -> ".join(p.name for p in [*chain, path])
            raise ConfigError([ConfigProblem("extends", f"profiles extend in a cycle: {cycle}",
                                             str(path))])
        chain.append(path)
        parent = read_toml(path).get("extends")
        path = profile_path(parent, path.parent) if parent else None
    base = profiles_dir() / "base.toml"
    return [base, *(p for p in reversed(chain) if p != base)]


# --------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class Layers:
    """Where configuration comes from, besides the plugins' defaults."""

    files: Sequence[Path]
    sets: Sequence[str] = ()
    overrides: Mapping[str, Any] | None = None  # a profile given as a dict (tests)


@dataclass
class Settings:
    """The merged configuration with the source of every key."""

    data: dict[str, Any]
    sources: dict[str, str]
    files: list[Path]

    def get(self, path: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def source(self, path: str) -> str:
        while path:
            if path in self.sources:
                return self.sources[path]
            path = path.rpartition(".")[0]
        return ""


def parse_set(assignment: str) -> tuple[str, Any]:
    """``section.key=value``, the value parsed as TOML (``9000`` is an int, ``abc`` a string)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+", key):
        raise ConfigError([ConfigProblem(key or assignment, "expected --set section.key=value",
                                         f"--set {assignment}")])
    return key.lower(), parse_conf_data(raw, tomlfy=True)


def load_settings(layers: Layers, defaults: Mapping[str, Any],
                  owners: Mapping[str, str] | None = None) -> Settings:
    """Merge every layer with dynaconf and record where each key came from."""
    init = {key.upper(): value for key, value in copy.deepcopy(dict(defaults)).items()}
    dyn = Dynaconf(
        envvar_prefix=ENV_PREFIX,
        environments=False,
        load_dotenv=False,
        merge_enabled=True,
        settings_files=[str(path) for path in layers.files],
        **init,
    )
    if layers.overrides:
        dyn.update(copy.deepcopy(dict(layers.overrides)), loader_identifier="profile dict",
                   validate=False)
    for assignment in layers.sets:
        key, value = parse_set(assignment)
        dyn.set(key, value, loader_identifier=f"--set {key}", validate=False)

    data = {
        key.lower(): value
        for key, value in _lower_keys(dyn.as_dict()).items()
        if key.upper() not in _DYNACONF_OPTIONS
        and key.lower() not in PROFILE_META_KEYS
        and not (key.upper() in RESERVED_ENV and key.lower() not in KERNEL_SECTIONS)
    }
    sources = _sources(layers, defaults, owners or {})
    return Settings(data=data, sources=sources, files=list(layers.files))


def _sources(layers: Layers, defaults: Mapping[str, Any],
             owners: Mapping[str, str]) -> dict[str, str]:
    """Which layer set each key: the last one that names it, as dynaconf merges them."""
    sources: dict[str, str] = {}
    for path in _leaf_paths(_lower_keys(defaults)):
        owner = next((owners[s] for s in owners if path == s or path.startswith(s + ".")), "")
        sources[path] = f"defaults of plugin {owner}" if owner else "defaults"
    for file in layers.files:
        tree = {k: v for k, v in read_toml(file).items() if k not in PROFILE_META_KEYS}
        sources.update(dict.fromkeys(_leaf_paths(_lower_keys(tree)), str(file)))
    if layers.overrides:
        sources.update(dict.fromkeys(_leaf_paths(_lower_keys(layers.overrides)), "profile dict"))
    prefix = ENV_PREFIX + "_"
    for variable in sorted(os.environ):
        name = variable.removeprefix(prefix)
        if variable.startswith(prefix) and name.upper() not in RESERVED_ENV:
            path = ".".join(name.lower().split("__"))
            sources = {k: v for k, v in sources.items() if not k.startswith(path + ".")}
            sources[path] = f"environment variable {variable}"
    for assignment in layers.sets:
        key = assignment.partition("=")[0].strip().lower()
        sources = {k: v for k, v in sources.items() if not k.startswith(key + ".")}
        sources[key] = f"--set {key}"
    return sources


def _lower_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k).lower(): _lower_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lower_keys(v) for v in value]
    return value


def _leaf_paths(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _leaf_paths(value, path + ".")
        else:
            yield path


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def nest(path: str, value: Any) -> dict[str, Any]:
    """``nest("a.b", v)`` is ``{"a": {"b": v}}``."""
    for part in reversed(path.split(".")):
        value = {part: value}
    return dict(value)


# --------------------------------------------------------------------------- masking, freezing


def masked(tree: Mapping[str, Any], secret_paths: frozenset[str] = frozenset(),
           prefix: str = "") -> dict[str, Any]:
    """A copy of ``tree`` with every secret value replaced by ``********``."""
    result: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            result[key] = masked(value, secret_paths, path + ".")
        elif value not in ("", None) and (SECRET_KEY.search(key) or path in secret_paths):
            result[key] = MASK
        else:
            result[key] = value
    return result


def freeze(value: Any) -> Any:
    """A read-only deep copy: mappings become ``MappingProxyType``, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    return value


def thaw(value: Any) -> Any:
    """A plain, writable copy of a frozen tree (for showing or dumping)."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return value


def kernel_spec_defaults() -> dict[str, Any]:
    """The kernel's own sections and their defaults, as ``profiles/base.toml`` declares them."""
    base = read_toml(profiles_dir() / "base.toml")
    return {section: base.get(section, {}) for section in KERNEL_SECTIONS}
