"""The registry: every model Inferno may serve, by name, and where its file is.

Entries come from the profile (``[plugins.models.entries.NAME]``), from the
manifest (``models.toml``, written by ``inferno models add``) and from scanning
the configured directories. A request names a model; only the registry turns a
name into a path, so no request can make Inferno open a file of its choosing.

A path may point into an installed Python package: ``pkg:module/relative/path``
for a file shipped inside it, ``pkg:module:function`` for a package that builds
its model file on first use (a model split into several packages, for
example); the function returns the file's path and is called once per
package version.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError, ModelFileError, ModelNotFound
from .formats import detect_format

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ENTRY_KEYS = frozenset({"path", "backend", "format", "parameters", "chat_template",
                        "system_prompt", "aliases", "sha256", "options", "keep_alive",
                        "preload", "description"})


def check_name(name: str, where: str = "model name") -> str:
    """``name`` if it is a safe identifier, else a ``ModelError`` saying what is allowed."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ModelError(str(name), f"is not a valid {where}: use letters, digits and . _ : - "
                                    f"(at most 128, starting with a letter or digit)")
    return name


@dataclass(frozen=True)
class Entry:
    """One registered model."""

    name: str
    path: Path | None
    source: str  # where it was registered: the profile, the manifest, a scanned folder
    backend: str = ""
    format: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    chat_template: str = ""
    system_prompt: str = ""
    aliases: tuple[str, ...] = ()
    sha256: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    keep_alive: float | None = None
    preload: bool = False
    description: str = ""
    #: Why the model cannot be used (its package is not installed, say); empty when it can.
    unavailable: str = ""

    def require_path(self) -> Path:
        if self.path is None or self.unavailable:
            raise ModelError(self.name, f"is unavailable: {self.unavailable}")
        return self.path

    def backend_options(self) -> dict[str, Any]:
        """Options for the backend: its load options plus what the entry says about chat."""
        options = dict(self.options)
        for key in ("chat_template", "system_prompt"):
            if getattr(self, key):
                options[key] = getattr(self, key)
        if self.parameters:
            options["parameters"] = dict(self.parameters)
        return options


class PackagePaths:
    """Resolves ``pkg:`` paths, remembering what ``pkg:module:function`` returned."""

    def __init__(self, cache_file: Path | None) -> None:
        self.cache_file = cache_file
        self._cache: dict[str, dict[str, str]] = {}
        if cache_file is not None and cache_file.is_file():
            try:
                self._cache = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                self._cache = {}

    def resolve(self, value: str) -> Path:
        """A filesystem path for ``value``; ``ModelError`` naming the package if it is missing."""
        if not value.startswith("pkg:"):
            return Path(value).expanduser()
        target = value[4:]
        module, sep, function = target.partition(":")
        if sep:
            return self._built(value, module, function)
        package, _, relative = target.partition("/")
        return self._package_dir(value, package) / relative

    def _package_dir(self, value: str, package: str) -> Path:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(value, f"package {package!r} is not installed")
        return Path(next(iter(spec.submodule_search_locations)))

    def _built(self, value: str, module: str, function: str) -> Path:
        version = _version_of(module, self._package_dir(value, module.split(".", maxsplit=1)[0]))
        known = self._cache.get(value)
        if known and known.get("version") == version and Path(known["path"]).is_file():
            return Path(known["path"])
        try:
            made = getattr(importlib.import_module(module), function)()
        except Exception as exc:
            raise ModelError(value, f"{module}.{function}() failed: {type(exc).__name__}: "
                                    f"{exc}") from None
        path = Path(made)
        self._cache[value] = {"version": version, "path": str(path)}
        if self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            self.cache_file.write_text(json.dumps(self._cache, indent=1))
        return path


def _version_of(module: str, where: Path) -> str:
    """The installed version of the distribution holding ``module``, or its folder's mtime."""
    top = module.split(".", maxsplit=1)[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return str(where.stat().st_mtime_ns)


_TYPES: Mapping[str, tuple[type, ...]] = {
    "path": (str,), "backend": (str,), "format": (str,), "parameters": (Mapping,),
    "chat_template": (str,), "system_prompt": (str,), "aliases": (list, tuple),
    "sha256": (str,), "options": (Mapping,), "keep_alive": (int, float), "preload": (bool,),
    "description": (str,)}


def table_problems(name: str, table: Any) -> list[tuple[str, str]]:
    """``(key, problem)`` for everything wrong with an entry's table, without touching files."""
    if not isinstance(table, Mapping):
        return [("", "must be a table with at least a path")]
    problems = []
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        problems.append(("", "is not a valid model name: use letters, digits and . _ : - "
                             "(at most 128, starting with a letter or digit)"))
    for key in sorted(set(table) - ENTRY_KEYS):
        close = difflib.get_close_matches(key, ENTRY_KEYS, n=1)
        problems.append((key, "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")))
    for key, types in _TYPES.items():
        value = table.get(key)
        if value is not None and (not isinstance(value, types) or (
                bool not in types and isinstance(value, bool))):
            problems.append((key, f"must be {' or '.join(t.__name__ for t in types)}, "
                                  f"got {value!r}"))
    if not table.get("path"):
        problems.append(("path", "is required: the model file (or a pkg: path)"))
    for alias in table.get("aliases") or ():
        if not isinstance(alias, str) or not NAME.fullmatch(alias):
            problems.append(("aliases", f"{alias!r} is not a valid name"))
    keep_alive = table.get("keep_alive")
    if isinstance(keep_alive, int | float) and keep_alive < -1:
        problems.append(("keep_alive", "must be -1 (forever), 0 or a number of seconds"))
    return problems


def entry_from_table(name: str, table: Mapping[str, Any], source: str,
                     paths: PackagePaths, base: Path | None = None) -> Entry:
    """An ``Entry`` from a profile or manifest table; a bad table raises ``ModelError``."""
    problems = table_problems(name, table)
    if problems:
        key, problem = problems[0]
        raise ModelError(name, f"{key + ' ' if key else ''}{problem} ({source})")
    raw_path = str(table["path"])
    aliases = tuple(table.get("aliases", ()))
    keep_alive = table.get("keep_alive")
    unavailable = ""
    path: Path | None = None
    try:
        path = paths.resolve(raw_path)
        if base is not None and not path.is_absolute():
            path = base / path
        options = {key: (str(paths.resolve(value)) if isinstance(value, str)
                         and value.startswith("pkg:") else value)
                   for key, value in dict(table.get("options", {})).items()}
    except ModelError as exc:
        unavailable, options = exc.reason + f" ({raw_path})", dict(table.get("options", {}))
    return Entry(
        name=name, path=path, source=source, backend=str(table.get("backend", "")),
        format=str(table.get("format", "")), parameters=dict(table.get("parameters", {})),
        chat_template=str(table.get("chat_template", "")),
        system_prompt=str(table.get("system_prompt", "")), aliases=aliases,
        sha256=str(table.get("sha256", "")), options=options,
        keep_alive=None if keep_alive is None else float(keep_alive),
        preload=bool(table.get("preload", False)),
        description=str(table.get("description", "")), unavailable=unavailable)


def scan(directories: Iterable[Path]) -> Iterable[tuple[str, Path, str]]:
    """``(name, path, format)`` for every model file under ``directories``, recursively."""
    for directory in directories:
        if not directory.is_dir():
            raise ModelFileError(directory, "is not a directory (models.directories)")
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            try:
                format_ = detect_format(path)
            except ModelFileError:
                continue  # not a model file: READMEs, tokenizers, configs
            yield name_for(path), path, format_


def name_for(path: Path) -> str:
    """A model name from a file name: ``Llama-3.2-1B.Q4_K_M.gguf`` → ``llama-3.2-1b.q4_k_m``."""
    stem = path.name.rsplit(".", 1)[0] if "." in path.name else path.name
    if stem == "model":  # model.onnx, model.safetensors: the folder names the model
        stem = path.parent.name
    name = re.sub(r"[^a-z0-9._:-]+", "-", stem.lower()).strip("-._:")
    return name[:128] or "model"


class Registry:
    """Names and aliases to entries."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.aliases: dict[str, str] = {}
        self.problems: list[str] = []

    def add(self, entry: Entry, *, replace: bool = False) -> None:
        taken = self.entries.get(entry.name) or self.entries.get(self.aliases.get(entry.name, ""))
        if taken is not None and not replace:
            self.problems.append(f"{entry.name}: registered by {taken.source}; the one from "
                                 f"{entry.source} is ignored")
            return
        self.entries[entry.name] = entry
        for alias in entry.aliases:
            if alias in self.entries or self.aliases.get(alias, entry.name) != entry.name:
                self.problems.append(f"{entry.name}: alias {alias!r} is taken; ignored")
                continue
            self.aliases[alias] = entry.name

    def remove(self, name: str) -> Entry:
        entry = self.get(name)
        del self.entries[entry.name]
        self.aliases = {a: n for a, n in self.aliases.items() if n != entry.name}
        return entry

    def get(self, name: str) -> Entry:
        """The entry for a name or alias; ``ModelNotFound`` with suggestions otherwise."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ModelNotFound(str(name)[:64], "is not a model name (names are letters, digits "
                                                "and . _ : -, never paths)")
        entry = self.entries.get(self.aliases.get(name, name))
        if entry is None:
            known = [*self.entries, *self.aliases]
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            listed = ", ".join(sorted(self.entries)) or "none"
            raise ModelNotFound(name, f"no such model{hint} (registered: {listed})")
        return entry
