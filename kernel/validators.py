"""Validators for the kernel's own sections (their defaults live in ``profiles/base.toml``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dynaconf import Validator

from .logs import LEVELS
from .resources import parse_amount


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
