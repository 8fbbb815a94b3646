"""Sampling parameters: one validated record for every text backend and protocol.

A request's ``params`` mapping is checked here once, with an error that names
the parameter, the value and the accepted range, before any token is decoded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from inferno.plugins.models.errors import RequestError


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token and when to stop."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    #: ``None``: as many as the context leaves room for.
    max_tokens: int | None = 256
    stop: tuple[str, ...] = ()
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    #: ``None``, ``"json"`` (any JSON object) or ``"json_schema"`` (``schema`` required).
    response_format: str | None = None
    schema: Mapping[str, Any] | None = None
    #: Generate ``max_tokens`` tokens whatever the model says: its end tokens are banned
    #: (load generators use it to get the same number of tokens from every request).
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_RANGES: dict[str, tuple[float, float, bool]] = {
    # name: (low, high, low inclusive)
    "temperature": (0.0, 100.0, True),
    "top_p": (0.0, 1.0, False),
    "min_p": (0.0, 1.0, True),
    "repeat_penalty": (0.0, 10.0, False),
    "presence_penalty": (-2.0, 2.0, True),
    "frequency_penalty": (-2.0, 2.0, True),
}
_NAMES = {f.name for f in fields(Sampling)}


def parse_sampling(model: str, params: Mapping[str, Any],
                   defaults: Mapping[str, Any] | None = None) -> Sampling:
    """``params`` over the model's ``defaults``, checked; ``RequestError`` names what is wrong."""
    merged = {**(defaults or {}), **params}
    unknown = sorted(set(merged) - _NAMES)
    if unknown:
        raise RequestError(model, f"unknown sampling parameter {unknown[0]!r} "
                                  f"(known: {', '.join(sorted(_NAMES))})")
    values: dict[str, Any] = {}
    for name, (low, high, inclusive) in _RANGES.items():
        if name in merged:
            values[name] = _number(model, name, merged[name], low, high, inclusive=inclusive)
    if "top_k" in merged:
        values["top_k"] = _integer(model, "top_k", merged["top_k"], 0)
    if merged.get("seed") is not None:
        values["seed"] = _integer(model, "seed", merged["seed"], 0)
    if "max_tokens" in merged:
        values["max_tokens"] = (None if merged["max_tokens"] in (None, -1)
                                else _integer(model, "max_tokens", merged["max_tokens"], 1))
    if "stop" in merged:
        values["stop"] = _stops(model, merged["stop"])
    if "logit_bias" in merged:
        values["logit_bias"] = _logit_bias(model, merged["logit_bias"])
    if "ignore_eos" in merged:
        if not isinstance(merged["ignore_eos"], bool):
            raise RequestError(model, f"ignore_eos must be true or false, "
                                      f"got {merged['ignore_eos']!r}")
        values["ignore_eos"] = merged["ignore_eos"]
    values.update(_format(model, merged.get("response_format"), merged.get("schema")))
    if values.get("ignore_eos") and values.get("response_format"):
        raise RequestError(model, "ignore_eos cannot be combined with response_format "
                                  f"{values['response_format']!r}: a complete JSON value has "
                                  "to end, and only filler could follow it")
    return Sampling(**values)


def _number(model: str, name: str, value: Any, low: float, high: float, *,
            inclusive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise RequestError(model, f"{name} must be a number, got {value!r}")
    ok = (low <= value if inclusive else low < value) and value <= high
    if not ok:
        bracket = "[" if inclusive else "("
        raise RequestError(model, f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _integer(model: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(model, f"{name} must be an integer ≥ {low}, got {value!r}")
    return value


def _stops(model: str, value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, Sequence) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(model, f"stop must be a non-empty string or a list of them, "
                                  f"got {value!r}")
    return tuple(stops)


def _logit_bias(model: str, value: Any) -> dict[int, float]:
    if not isinstance(value, Mapping):
        raise RequestError(model, f"logit_bias must map token ids to numbers, got {value!r}")
    bias: dict[int, float] = {}
    for token, amount in value.items():
        try:
            token_id = int(token)
        except (TypeError, ValueError):
            token_id = -1
        if token_id < 0 or isinstance(token, bool | float):
            raise RequestError(model, f"logit_bias key {token!r} is not a token id")
        bias[token_id] = _number(model, f"logit_bias[{token_id}]", amount, -100.0, 100.0,
                                 inclusive=True)
    return bias


def _format(model: str, kind: Any, schema: Any) -> dict[str, Any]:
    if kind in (None, "text"):
        if schema is not None:
            raise RequestError(model, "schema is given but response_format is not "
                                      "'json_schema'")
        return {}
    if kind == "json":
        return {"response_format": "json"}
    if kind != "json_schema":
        raise RequestError(model, f"response_format must be 'text', 'json' or 'json_schema', "
                                  f"got {kind!r}")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise RequestError(model, f"schema is not valid JSON: {exc}") from None
    if not isinstance(schema, Mapping) or not schema:
        raise RequestError(model, "response_format 'json_schema' needs a schema: a JSON object")
    if problem := schema_problem(schema):
        raise RequestError(model, f"invalid JSON Schema: {problem}")
    return {"response_format": "json_schema", "schema": dict(schema)}


_SCHEMA_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
#: Keywords whose value is an object of named subschemas, a list of them, or one of them.
_NAMED_SUBSCHEMAS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("additionalProperties", "not", "contains", "propertyNames")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def schema_problem(schema: Any, where: str = "schema") -> str | None:
    """The first structural mistake in a JSON Schema, with its path; ``None`` if there is none.

    llama.cpp's grammar converter accepts some nonsense silently (a ``required`` that is not a
    list, say) and fails on the rest with Python internals; this says what is wrong instead.
    """
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, Mapping):
        return f"{where} must be an object (or true/false), got {schema!r}"
    kinds = schema.get("type", [])
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind not in _SCHEMA_TYPES:
            return f"{where}.type must be one of {', '.join(_SCHEMA_TYPES)}, got {kind!r}"
    for key in _NAMED_SUBSCHEMAS:
        named = schema.get(key, {})
        if not isinstance(named, Mapping):
            return f"{where}.{key} must be an object of named schemas, got {named!r}"
        for name, sub in named.items():
            if problem := schema_problem(sub, f"{where}.{key}.{name}"):
                return problem
    for key in (*_SUBSCHEMA_LISTS, "items"):
        subs = schema.get(key, [True])
        if key == "items" and not isinstance(subs, list):
            subs = [subs]  # one schema for every item, or a list of them, one per position
        if not isinstance(subs, list) or not subs:
            return f"{where}.{key} must be a non-empty list of schemas, got {subs!r}"
        for index, sub in enumerate(subs):
            if problem := schema_problem(sub, f"{where}.{key}[{index}]"):
                return problem
    for key in _SUBSCHEMAS:
        if problem := schema_problem(schema.get(key, True), f"{where}.{key}"):
            return problem
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        return f"{where}.required must be a list of property names, got {required!r}"
    properties = schema.get("properties")
    undefined = [name for name in required if properties is not None and name not in properties]
    if undefined:
        return f"{where}.required names {undefined[0]!r}, which {where}.properties does not define"
    for key in _COUNTS:
        count = schema.get(key, 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            return f"{where}.{key} must be an integer ≥ 0, got {count!r}"
    enum = schema.get("enum", [None])
    if not isinstance(enum, list) or not enum:
        return f"{where}.enum must be a non-empty list, got {enum!r}"
    return None
