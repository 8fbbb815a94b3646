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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dynaconf import Dynaconf, Validator
from dynaconf.utils.parse_conf import parse_conf_data

from .errors import ConfigError, ConfigProblem, ProfileNotFound
from .validation import KERNEL_SECTIONS, MASK, is_secret

ENV_PREFIX = "INFERNO"
PROFILE_META_KEYS = ("extends", "description")
#: Variables that configure the command line, not a config key.
RESERVED_ENV = frozenset({"CONFIG", "PROFILE", "TRACE_HOOKS"})
#: Keys under ``[plugins]`` that are not plugin names.
PLUGINS_RESERVED = frozenset({"allow", "block"})
_DYNACONF_OPTIONS = {"LOAD_DOTENV"}


@dataclass(frozen=True)
class ConfigSpec:
    """A plugin's settings: defaults (which also fix each key's type) and validators.

    A key that has a validator is checked by it alone, not by its default's type.

    Keys are relative to the plugin's section. With ``strict`` a key that has no
    default is reported as unknown; a default of ``{}`` accepts any sub-keys.
    ``secrets`` names keys to mask beyond those that look secret by name. ``section``
    lets a hook plugin own a top-level section (``[audit]``, so ``INFERNO_AUDIT__KEY``
    sets ``audit.key``) instead of ``[plugins.<name>]``.
    """

    defaults: Mapping[str, Any] = field(default_factory=dict)
    validators: Sequence[Validator] = ()
    secrets: frozenset[str] = frozenset()
    strict: bool = True
    section: str | None = None


# --------------------------------------------------------------------------- profiles


def profiles_dir() -> Path:
    """The folder of the profiles shipped with Inferno."""
    return Path(str(resources.files("inferno.profiles")))


def shipped_profiles() -> dict[str, Path]:
    return {path.stem: path for path in sorted(profiles_dir().glob("*.toml"))}


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's contents, or an error that names the file and what is wrong with it."""
    if path.is_dir():
        raise ProfileNotFound(f"{path} is a directory, not a TOML file")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ProfileNotFound(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem("<file>", f"not UTF-8 text: {exc.reason} at byte "
                                                   f"{exc.start}", str(path))]) from exc
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
        if parent is not None and not (isinstance(parent, str) and parent):
            raise ConfigError([ConfigProblem(
                "extends", f"must name one profile or profile file, got {parent!r}", str(path))])
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
        """The layer that set ``path``, an enclosing table, or a key inside it."""
        probe = path
        while probe:
            if probe in self.sources:
                return self.sources[probe]
            probe = probe.rpartition(".")[0]
        inside = sorted(k for k in self.sources if k.startswith(path + "."))
        return self.sources[inside[0]] if inside else ""


def parse_set(assignment: str) -> tuple[str, Any]:
    """``section.key=value``, the value parsed as TOML (``9000`` is an int, ``abc`` a string)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+", key):
        shown = (key.split() or ["?"])[0]  # never echo what follows: it may be a secret
        raise ConfigError([ConfigProblem(shown, "expected --set section.key=value", "--set")])
    try:
        return key.lower(), _typed(raw, key.lower())
    except ValueError as exc:
        raise ConfigError([ConfigProblem(key.lower(), str(exc), f"--set {key.lower()}")]) from exc


def load_settings(layers: Layers, defaults: Mapping[str, Any],
                  owners: Mapping[str, str] | None = None) -> Settings:
    """Merge every layer with dynaconf and record where each key came from.

    Inferno reads the files and the environment itself and hands each layer to
    dynaconf in order: dynaconf's own loaders would also read ``NAME.local.toml``
    beside each file and ``*_FOR_DYNACONF`` variables, which is discovery this
    configuration must not do. Tables merge key by key; a list is replaced whole
    by the highest layer that sets it (dynaconf alone would append, and a higher
    layer could never remove an entry from ``[plugins] block``).
    """
    raw = _raw_layers(layers, defaults, owners or {})
    dyn = Dynaconf(environments=False, load_dotenv=False, envvar_prefix=ENV_PREFIX,
                   settings_files=[], includes=[], preload=[], core_loaders=[], loaders=[],
                   merge_enabled=True)
    for layer in raw:
        if layer.tree:
            dyn.update(copy.deepcopy(dict(layer.tree)), merge=True, validate=False,
                       loader_identifier=layer.describe(""))
    data = {key: value for key, value in _lower_keys(dyn.as_dict()).items()
            if key.upper() not in _DYNACONF_OPTIONS}
    winners = _winning_layers(raw)
    for path, layer in winners.items():
        value = _at(layer.tree, path)
        if isinstance(value, list):
            _put(data, path, copy.deepcopy(value))
    sources = {path: layer.describe(path) for path, layer in winners.items()}
    return Settings(data=data, sources=sources, files=list(layers.files))


@dataclass(frozen=True)
class _Layer:
    """One layer as written, before merging; ``root`` is the one key an environment
    variable or a ``--set`` gives (a table there merges, anything else replaces)."""

    tree: Mapping[str, Any]
    describe: Callable[[str], str]
    root: str = ""


def _raw_layers(layers: Layers, defaults: Mapping[str, Any],
                owners: Mapping[str, str]) -> list[_Layer]:
    """Every layer, lowest first, each value already parsed; raises every bad value at once."""
    def default_owner(path: str) -> str:
        owner = next((owners[s] for s in owners if path == s or path.startswith(s + ".")), "")
        return f"defaults of plugin {owner}" if owner else "defaults"

    raw = [_Layer(_lower_keys(defaults), default_owner)]
    for file in layers.files:
        tree = {k: v for k, v in read_toml(file).items() if k not in PROFILE_META_KEYS}
        raw.append(_Layer(_lower_keys(tree), _fixed(str(file))))
    if layers.overrides:
        raw.append(_Layer(_lower_keys(layers.overrides), _fixed("profile dict")))
    problems: list[ConfigProblem] = []
    prefix = ENV_PREFIX + "_"
    for variable in sorted(os.environ):
        name = variable.removeprefix(prefix)
        if variable.startswith(prefix) and name.upper() not in RESERVED_ENV:
            path = ".".join(name.lower().split("__"))
            source = f"environment variable {variable}"
            try:
                value = _typed(os.environ[variable], path)
            except ValueError as exc:
                problems.append(ConfigProblem(path, str(exc), source))
                continue
            raw.append(_Layer(nest(path, _lower_keys(value)), _fixed(source), root=path))
    for assignment in layers.sets:
        try:
            key, value = parse_set(assignment)
        except ConfigError as exc:
            problems += exc.problems
            continue
        raw.append(_Layer(nest(key, _lower_keys(value)), _fixed(f"--set {key}"), root=key))
    for layer in raw:
        problems += _unparsable(layer)
    if problems:
        raise ConfigError(problems)
    return raw


def _typed(text: str, path: str) -> Any:
    """A value from the command line or the environment, read as TOML when it parses
    (``9000`` is an int, ``[1, 2]`` a list) and as a string otherwise."""
    try:
        return parse_conf_data(text, tomlfy=True)
    except Exception as exc:  # dynaconf's @int, @json ... converters raise their own types
        shown = MASK if is_secret(path) else repr(text)
        raise ValueError(f"cannot read {shown}: {type(exc).__name__}") from exc


def _unparsable(layer: _Layer) -> list[ConfigProblem]:
    """Strings dynaconf would interpret (``@int x``, ``@json {``) and cannot."""
    problems = []
    for path in _leaf_paths(layer.tree):
        value = _at(layer.tree, path)
        if isinstance(value, str) and value.startswith("@"):
            try:
                parse_conf_data(value, tomlfy=False)
            except Exception as exc:
                shown = MASK if is_secret(path) else repr(value)
                problems.append(ConfigProblem(path, f"cannot read {shown}: {type(exc).__name__}",
                                              layer.describe(path)))
    return problems


def _fixed(description: str) -> Callable[[str], str]:
    return lambda _: description


def _winning_layers(raw: Sequence[_Layer]) -> dict[str, _Layer]:
    winners: dict[str, _Layer] = {}
    for layer in raw:
        if layer.root and not isinstance(_at(layer.tree, layer.root), Mapping):
            # a scalar or a list replaces everything below it; a table merges
            winners = {k: v for k, v in winners.items()
                       if k != layer.root and not k.startswith(layer.root + ".")}
        for path in _leaf_paths(layer.tree):
            winners[path] = layer
    return winners


def _at(tree: Any, path: str) -> Any:
    for part in path.split("."):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree


def _put(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


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
        elif value not in ("", None, [], ()) and is_secret(path, secret_paths):
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
