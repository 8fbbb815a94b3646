"""Validation of the merged configuration: unknown keys, types inferred from defaults,
the plugins' dynaconf validators, and the validators of the kernel's own sections.
Every problem is collected; none stops the search for the next."""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dynaconf import Dynaconf, ValidationError, Validator

from .contracts import KINDS_BY_SECTION
from .errors import ConfigError, ConfigProblem
from .logs import LEVELS
from .resources import parse_amount

if TYPE_CHECKING:
    from .config import ConfigSpec, Settings

KERNEL_SECTIONS = ("kernel", "logging", "resources", "plugins")
MASK = "********"
SECRET_KEY = re.compile(r"(^|_)(key|secret|password|passwd|token|credentials?|passphrase)$")

def validate(settings: Settings, specs: Mapping[str, ConfigSpec],
             extra_keys: Mapping[str, frozenset[str]] | None = None) -> list[ConfigProblem]:
    """Every problem in ``settings`` against the specs (keyed by section path)."""
    problems: list[ConfigProblem] = []
    known_top = {*KERNEL_SECTIONS, *KINDS_BY_SECTION, *(path for path in specs if "." not in path)}
    for section in settings.data:
        if section not in known_top:
            problems.append(_problem(settings, section,
                                     f"unknown section{_suggest(section, known_top)}"))
    for path, spec in specs.items():
        tree = settings.get(path, {})
        if not isinstance(tree, Mapping):
            problems.append(_problem(settings, path, "must be a table"))
            continue
        allowed = (extra_keys or {}).get(path, frozenset())
        for key in spec.defaults:
            if key not in tree:  # only when a higher layer replaced the whole table
                problems.append(ConfigProblem(
                    f"{path}.{key}", f"is missing: [{path}] was replaced as a whole",
                    settings.source(path)))
        if spec.strict:
            problems += _unknown_keys(settings, path, tree, spec.defaults, allowed)
        checked = {name.split(".")[0] for v in spec.validators for name in v.names}
        typed = {k: v for k, v in spec.defaults.items() if k not in checked}
        found = _type_problems(settings, path, tree, typed)
        found += _run_validators(settings, path, tree, spec.validators)
        secrets = {f"{path}.{key}" for key in spec.secrets}
        problems += [_redacted(settings, p, secrets) for p in found]
    return problems


def is_secret(path: str, declared: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether the value at ``path`` must never be shown: declared, or secret by its name."""
    return path in declared or any(_covers(d, path) for d in declared) \
        or bool(SECRET_KEY.search(path.rpartition(".")[2]))


def _covers(pattern: str, path: str) -> bool:
    """A declared secret covers every key below it, and its parts may be ``*``
    (``notifiers.*.headers`` covers each notifier's headers)."""
    want, parts = pattern.split("."), path.split(".")
    return len(parts) >= len(want) and all(w in ("*", p) for w, p in zip(want, parts,
                                                                         strict=False))


def _redacted(settings: Settings, problem: ConfigProblem, declared: set[str]) -> ConfigProblem:
    value = settings.get(problem.key)
    if not is_secret(problem.key, declared) or value in ("", None):
        return problem
    message = problem.message.replace(repr(value), MASK).replace(str(value), MASK)
    return ConfigProblem(problem.key, message, problem.source)


def _unknown_keys(settings: Settings, path: str, tree: Mapping[str, Any],
                  defaults: Mapping[str, Any], allowed: frozenset[str]) -> list[ConfigProblem]:
    problems = []
    for key, value in tree.items():
        if key in allowed:
            continue
        if key not in defaults:
            hint = _suggest(key, set(defaults))
            problems.append(_problem(settings, f"{path}.{key}", f"unknown key{hint}"))
        elif isinstance(defaults[key], Mapping) and defaults[key] and isinstance(value, Mapping):
            problems += _unknown_keys(settings, f"{path}.{key}", value, defaults[key],
                                      frozenset())
    return problems


def _type_problems(settings: Settings, path: str, tree: Mapping[str, Any],
                   defaults: Mapping[str, Any]) -> list[ConfigProblem]:
    problems = []
    for key, default in defaults.items():
        if key not in tree or default is None:
            continue
        value, where = tree[key], f"{path}.{key}"
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                problems.append(_problem(settings, where, f"must be a table, got {value!r}"))
            elif default:
                problems += _type_problems(settings, where, value, default)
            continue
        expected = _type_name(default)
        if _type_name(value) != expected and not (expected == "float" and
                                                   _type_name(value) == "integer"):
            problems.append(_problem(settings, where, f"must be {_article(expected)}, "
                                                      f"got {_type_name(value)} {value!r}"))
    return problems


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, Mapping):
        return "table"
    return type(value).__name__


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


_OPERATION_WORDS = {
    "is_type_of": "be of type", "is_in": "be one of", "is_not_in": "not be one of",
    "gte": "be at least", "gt": "be greater than", "lte": "be at most", "lt": "be less than",
    "eq": "equal", "ne": "not equal", "len_min": "have a length of at least",
    "len_max": "have a length of at most", "cont": "contain", "len_eq": "have a length of",
}


def _run_validators(settings: Settings, path: str, tree: Mapping[str, Any],
                    validators: Sequence[Validator]) -> list[ConfigProblem]:
    if not validators:
        return []
    scoped = Dynaconf(environments=False, load_dotenv=False, envvar_prefix=False,
                      settings_files=[])
    scoped.update(copy.deepcopy(dict(tree)), validate=False)
    scoped.validators.register(*validators)
    try:
        scoped.validators.validate_all()
    except ValidationError as exc:
        problems = []
        for validator, message in exc.details:
            names = validator.names or ("?",)
            key = f"{path}.{names[0]}".lower()
            problems.append(_problem(settings, key, _readable(names[0], str(message))))
        return problems
    return []


def _readable(name: str, message: str) -> str:
    message = re.sub(r" in env \w+\.?$", "", message)
    message = message.removeprefix(name).strip()
    for operation, words in _OPERATION_WORDS.items():
        message = message.replace(f"must {operation} ", f"must {words} ")
    return re.sub(r"<class '(\w+)'>", r"\1", message)


def _problem(settings: Settings, key: str, message: str) -> ConfigProblem:
    return ConfigProblem(key=key, message=message, source=settings.source(key))


def _suggest(word: str, choices: set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def raise_problems(problems: Sequence[ConfigProblem]) -> None:
    if problems:
        raise ConfigError(problems)



# --------------------------------------------------------------------------- the kernel's sections


def _is_amount(value: Any) -> bool:
    if value == "auto":
        return True
    try:
        parse_amount(value)
    except (TypeError, ValueError):
        return False
    return True


def _all_amounts(value: Any) -> bool:
    return isinstance(value, Mapping) and all(_is_amount(v) for v in value.values())


def _all_levels(value: Any) -> bool:
    return isinstance(value, Mapping) and all(v in LEVELS for v in value.values())


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


KERNEL_VALIDATORS: Mapping[str, Sequence[Validator]] = {
    "kernel": (
        Validator("drain_timeout", "stop_timeout", is_type_of=(int, float), gte=0),
        Validator("event_queue_size", is_type_of=int, gte=1),
    ),
    "logging": (
        Validator("format", is_in=["console", "json"]),
        Validator("level", is_in=list(LEVELS)),
        Validator("levels", condition=_all_levels,
                  messages={"condition": "{name} must map plugin names to one of "
                                         + ", ".join(LEVELS) + ", got {value}"}),
    ),
    "resources": (
        Validator("memory", "cpu_threads", condition=_is_amount,
                  messages={"condition": "{name} must be \"auto\" or an amount like 8GiB, "
                                         "got {value!r}"}),
        Validator("budgets", condition=_all_amounts,
                  messages={"condition": "{name} must map budget names to amounts, "
                                         "got {value}"}),
    ),
    "plugins": (
        Validator("allow", "block", condition=_names,
                  messages={"condition": "{name} must be a list of plugin names, got {value}"}),
    ),
}
