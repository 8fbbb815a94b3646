"""The ONNX backend's settings: defaults in ``[backends.onnx]``, overridden per model.

One table of checks serves both places a setting can come from: the profile
(as dynaconf validators, so a bad value stops start-up with its key path) and a
model's own options (checked when the model loads, every problem at once).
This module imports nothing heavy, so declaring the settings stays cheap.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from dynaconf import Validator

from inferno.plugins.models.errors import ModelError

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
EXECUTION_MODES = ("sequential", "parallel")

DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "graph_optimization_level": "all",
    # 0: one thread per physical core this process may use.
    "intra_op_threads": 0,
    # 0: onnxruntime's own default.
    "inter_op_threads": 0,
    "execution_mode": "sequential",
    # Spinning threads keep cores busy between runs, stealing them from other models.
    "allow_spinning": False,
    # Where to save the optimised graph ("" for nowhere); relative to the driver's data dir.
    "optimized_model_dir": "",
    "providers": ["CPUExecutionProvider"],
    "provider_options": {},
    # Most texts in one session run of an encoder or classifier.
    "batch_size": 32,
    # Most tokens in one session run, padding included; a longer text runs alone. It bounds
    # a run's memory (attention grows with the square of the length).
    "max_batch_tokens": 4096,
    # "" looks for tokenizer.json beside the model; relative paths are from the model's folder.
    "tokenizer": "",
    # Tokens kept per text; 0 takes it from the files beside the tokenizer (or 512).
    "max_length": 0,
})


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _names(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
            and all(isinstance(name, str) and name for name in value))


def _tables(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(options, Mapping)
                                              for options in value.values())


#: Each setting's check and what a good value looks like.
CHECKS: Mapping[str, tuple[Callable[[Any], bool], str]] = MappingProxyType({
    "graph_optimization_level": (lambda v: v in OPTIMIZATION_LEVELS,
                                 f"must be one of {', '.join(OPTIMIZATION_LEVELS)}"),
    "intra_op_threads": (_count, "must be a whole number, 0 or more (0: one per physical core)"),
    "inter_op_threads": (_count, "must be a whole number, 0 or more (0: onnxruntime's default)"),
    "execution_mode": (lambda v: v in EXECUTION_MODES,
                       f"must be one of {', '.join(EXECUTION_MODES)}"),
    "allow_spinning": (lambda v: isinstance(v, bool), "must be true or false"),
    "optimized_model_dir": (lambda v: isinstance(v, str), "must be a folder path or \"\""),
    "providers": (_names, "must be a non-empty list of execution provider names, "
                          "for example [\"CPUExecutionProvider\"]"),
    "provider_options": (_tables, "must be a table of tables keyed by provider name, for "
                                  "example { CUDAExecutionProvider = { device_id = 0 } }"),
    "batch_size": (lambda v: _count(v) and v >= 1, "must be a whole number, 1 or more"),
    "max_batch_tokens": (lambda v: _count(v) and v >= 1, "must be a whole number, 1 or more"),
    "tokenizer": (lambda v: isinstance(v, str), "must be a path to a tokenizer.json or \"\""),
    "max_length": (_count, "must be a whole number, 0 or more (0: from the tokenizer's files)"),
})


#: What the model manager passes every backend from a model's entry; about generation, which
#: ONNX models do not do, so accepted and unused.
ENTRY_KEYS = frozenset({"chat_template", "system_prompt", "parameters"})


def validators() -> list[Validator]:
    """The checks as dynaconf validators, for the driver's ``ConfigSpec``."""
    return [Validator(key, condition=check, messages={"condition": f"{{name}} {words}, "
                                                                   f"got {{value!r}}"})
            for key, (check, words) in CHECKS.items()]


@dataclass(frozen=True)
class OnnxOptions:
    """The settings one model loads with: the driver's, with the model's own over them."""

    graph_optimization_level: str
    intra_op_threads: int
    inter_op_threads: int
    execution_mode: str
    allow_spinning: bool
    optimized_model_dir: str
    providers: tuple[str, ...]
    provider_options: Mapping[str, Mapping[str, Any]]
    batch_size: int
    max_batch_tokens: int
    tokenizer: str
    max_length: int


def resolve_options(model: str, config: Mapping[str, Any],
                    options: Mapping[str, Any]) -> OnnxOptions:
    """``config`` with ``options`` over it, or a ``ModelError`` naming every bad option."""
    problems = []
    options = {key: value for key, value in options.items() if key not in ENTRY_KEYS}
    for key in options:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, list(DEFAULTS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else \
                f"the ONNX backend's options are: {', '.join(DEFAULTS)}"
            problems.append(f"unknown option {key!r}; {hint}")
    merged = {**DEFAULTS, **config, **options}
    for key, (check, words) in CHECKS.items():
        if key in options and not check(options[key]):
            problems.append(f"option {key} {words}, got {options[key]!r}")
    if problems:
        raise ModelError(model, "; ".join(problems))
    return OnnxOptions(
        graph_optimization_level=merged["graph_optimization_level"],
        intra_op_threads=merged["intra_op_threads"],
        inter_op_threads=merged["inter_op_threads"],
        execution_mode=merged["execution_mode"],
        allow_spinning=merged["allow_spinning"],
        optimized_model_dir=merged["optimized_model_dir"],
        providers=tuple(merged["providers"]),
        provider_options={name: dict(values)
                          for name, values in merged["provider_options"].items()},
        batch_size=merged["batch_size"],
        max_batch_tokens=merged["max_batch_tokens"],
        tokenizer=merged["tokenizer"],
        max_length=merged["max_length"],
    )
