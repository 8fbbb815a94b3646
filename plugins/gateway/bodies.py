"""Request bodies in the OpenAI API's shape, checked field by field.

Each parser returns a plan the gateway runs, or raises ``ApiError`` (400) naming the
field (``param``) and what was wrong with it. Sampling values are checked again by the
backend against its own ranges; here it is types and shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import invalid
from .tools import Tools, parse_tools

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

#: Fields accepted and ignored because they change nothing here (or are set to their
#: harmless value); anything else unknown is refused, so a typo never goes unnoticed.
_IGNORED = frozenset({"store", "metadata", "service_tier", "parallel_tool_calls", "modalities",
                      "stream_options", "user", "logprobs", "top_logprobs", "prediction",
                      "reasoning_effort", "function_call", "functions"})
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
             "frequency_penalty", "seed", "stop", "logit_bias", "ignore_eos")
_COMMON = frozenset({"model", "max_tokens", "n", "stream", "keep_alive", "cache",
                     "response_format", *_SAMPLING})
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "tools", "tool_choice"}
COMPLETION_FIELDS = _COMMON | {"prompt", "suffix", "echo", "best_of"}
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user",
                              "keep_alive", "cache"})


@dataclass(frozen=True)
class GenerationPlan:
    """A chat or completion request, checked."""

    model: str
    kind: str  # "chat" or "completion"
    params: Mapping[str, Any]
    prompt: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    stream: bool = False
    include_usage: bool = False
    keep_alive: float | None = None
    cache: bool = True
    user: str | None = None
    tools: Tools | None = None


@dataclass(frozen=True)
class EmbeddingPlan:
    model: str
    inputs: Sequence[str]
    encoding_format: str = "float"
    keep_alive: float | None = None
    cache: bool = True
    user: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def loads(text: str, what: str, *, lines: bool = True) -> Any:
    """``text`` parsed as JSON, or a 400 (``invalid_json``) saying where ``what`` (``"the
    request body"``, ``"line 3"``) went wrong: bad syntax, nesting too deep to read, or a
    number of more digits than Python converts."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}" if lines else f"column {exc.colno}"
        raise invalid(f"{what} is not valid JSON: {exc.msg} at {where}", None,
                      "invalid_json") from None
    except RecursionError:
        raise invalid(f"{what} nests arrays or objects too deeply to read", None,
                      "invalid_json") from None
    except ValueError as exc:  # int digits over sys.get_int_max_str_digits
        raise invalid(f"{what} cannot be read: {str(exc).split(';')[0]}", None,
                      "invalid_json") from None


def require_object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise invalid(f"the request body must be a JSON object, got {_kind(body)}", None,
                      "invalid_json")
    return body


def parse_chat(body: Any) -> GenerationPlan:
    body = _checked(body, CHAT_FIELDS)
    messages = _messages(body.get("messages"))
    tools = parse_tools(body.get("tools"), body.get("tool_choice"),
                        body.get("parallel_tool_calls"))
    params = _params(body, "max_completion_tokens")
    if tools is not None and tools.active:
        params.pop("response_format", None)  # the tool grammar decides the shape
        params.pop("schema", None)
        if "response_format" in body and _format_type(body) != "text":
            raise invalid("response_format cannot be combined with tools; leave it out or "
                          "set tool_choice to 'none'", "response_format")
    return GenerationPlan(model=_model(body), kind="chat", params=params, messages=messages,
                          tools=tools, **_options(body))


def parse_completion(body: Any) -> GenerationPlan:
    body = _checked(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt must be a string (or a list of one string; token arrays and "
                      f"several prompts in one request are not supported), got {_kind(prompt)}",
                      "prompt")
    if body.get("suffix") not in (None, ""):
        raise invalid("suffix (fill-in-the-middle) is not supported", "suffix")
    if body.get("echo") not in (None, False):
        raise invalid("echo is not supported; the prompt is not repeated", "echo")
    if body.get("best_of") not in (None, 1):
        raise invalid("best_of must be 1", "best_of")
    return GenerationPlan(model=_model(body), kind="completion", params=_params(body),
                          prompt=prompt, **_options(body))


def parse_embeddings(body: Any) -> EmbeddingPlan:
    body = _checked(body, EMBEDDING_FIELDS)
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs:
        raise invalid("input must be a string or a non-empty list of strings, got "
                      f"{_kind(value)}", "input")
    for index, text in enumerate(inputs):
        if not isinstance(text, str):
            raise invalid(f"input[{index}] must be a string (token arrays are not supported), "
                          f"got {_kind(text)}", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise invalid(f"encoding_format must be 'float' or 'base64', got {encoding!r}",
                      "encoding_format")
    if body.get("dimensions") is not None:
        dims = body["dimensions"]
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            raise invalid(f"dimensions must be a positive integer, got {dims!r}", "dimensions")
    options = _options(body)
    return EmbeddingPlan(model=_model(body), inputs=inputs, encoding_format=encoding,
                         keep_alive=options["keep_alive"], cache=options["cache"],
                         user=options["user"], extra={"dimensions": body.get("dimensions")})


# --------------------------------------------------------------------------- pieces


def _checked(body: Any, known: frozenset[str]) -> Mapping[str, Any]:
    body = require_object(body)
    unknown = sorted(set(body) - known - _IGNORED)
    if unknown:
        raise invalid(f"unknown field {unknown[0]!r}; accepted fields: "
                      f"{', '.join(sorted(known))}", unknown[0], "unknown_field")
    if body.get("logprobs") not in (None, False):
        raise invalid("logprobs are not supported", "logprobs")
    if body.get("n") not in (None, 1):
        raise invalid(f"n must be 1: Inferno returns one choice per request, got "
                      f"{body.get('n')!r}", "n")
    return body


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid(f"model is required: the name of a model (see GET /v1/models), got "
                      f"{_kind(model)}", "model", "missing_model" if model is None else
                      "invalid_value")
    return model


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty list of {role, content} objects, got "
                      f"{_kind(value) if value != [] else 'an empty list'}", "messages")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise invalid(f"{where} must be an object, got {_kind(message)}", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(sorted(ROLES))}, got "
                          f"{role!r}", f"{where}.role")
        content = _content(message.get("content"), f"{where}.content",
                           optional=role == "assistant" and bool(message.get("tool_calls")))
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                 "content": content}
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"{where}.tool_call_id is required for a tool message",
                              f"{where}.tool_call_id")
            entry["tool_call_id"] = call_id
        if role == "assistant" and message.get("tool_calls"):
            entry["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        messages.append(entry)
    return messages


def _content(value: Any, where: str, *, optional: bool) -> str:
    if value is None and optional:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, Mapping) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else _kind(part)
                raise invalid(f"{where}[{index}] must be a text part {{type: 'text', text}}; "
                              f"{kind!r} parts are not supported", f"{where}[{index}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(f"{where} must be a string or a list of text parts, got {_kind(value)}",
                  where)


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise invalid(f"{where} must be a list", where)
    calls = []
    for index, call in enumerate(value):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) \
                or not isinstance(call.get("id", ""), str) \
                or not isinstance(function.get("arguments", "{}"), str | Mapping):
            raise invalid(f"{where}[{index}] must be {{id: string, type: 'function', function: "
                          f"{{name, arguments}}}}", f"{where}[{index}]")
        calls.append({"id": call.get("id", ""), "name": function["name"],
                      "arguments": function.get("arguments", "{}")})
    return calls


def _params(body: Mapping[str, Any], *alias: str) -> dict[str, Any]:
    params: dict[str, Any] = {name: body[name] for name in _SAMPLING
                              if body.get(name) is not None}
    limit = next((body[name] for name in ("max_tokens", *alias) if body.get(name) is not None),
                 None)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            param = "max_tokens" if body.get("max_tokens") is not None else alias[0]
            raise invalid(f"{param} must be a positive integer, got {limit!r}", param)
        params["max_tokens"] = limit
    for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty",
                 "frequency_penalty"):
        value = params.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            raise invalid(f"{name} must be a number, got {_kind(value)}", name)
    for name in ("top_k", "seed"):
        value = params.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise invalid(f"{name} must be an integer, got {_kind(value)}", name)
    if isinstance(params.get("logit_bias"), Mapping):
        params["logit_bias"] = dict(params["logit_bias"])
    format_type = _format_type(body)
    if format_type == "json_object":
        params["response_format"] = "json"
    elif format_type == "json_schema":
        spec = body["response_format"].get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise invalid("response_format.json_schema.schema must be a JSON Schema object",
                          "response_format")
        params["response_format"], params["schema"] = "json_schema", schema
    return params


def _format_type(body: Mapping[str, Any]) -> str:
    value = body.get("response_format")
    if value is None:
        return "text"
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise invalid("response_format must be {type: 'text' | 'json_object' | 'json_schema'}, "
                      f"got {value!r}", "response_format")
    return str(kind)


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool | type(None)):
        raise invalid(f"stream must be true or false, got {_kind(stream)}", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, Mapping):
        raise invalid("stream_options must be an object", "stream_options")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage must be true or false",
                      "stream_options.include_usage")
    cache = body.get("cache", True)
    if not (isinstance(cache, bool) or cache in ("no-store", "refresh")):
        raise invalid(f"cache must be true, false, 'no-store' or 'refresh', got "
                      f"{_kind(cache)}", "cache")
    cache = cache is True or cache == "refresh"
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid(f"user must be a string, got {_kind(user)}", "user")
    return {"stream": bool(stream), "include_usage": include_usage, "cache": cache,
            "keep_alive": parse_keep_alive(body.get("keep_alive")), "user": user}


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: Longer than this is "for good" (-1): a century, which dates can still express.
_FOREVER = 36525 * 86400.0


def parse_keep_alive(value: Any, param: str = "keep_alive") -> float | None:
    """Seconds as a number, or a duration like ``"5m"``, ``"30s"``, ``"1h"``; -1 keeps the
    model loaded for good and 0 unloads it after the request."""
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if text.endswith(u)), "")
        try:
            number = float(text[: len(text) - len(unit)]) * _UNITS.get(unit, 1.0)
        except ValueError:
            number = None
    if number is not None and not math.isnan(number):
        return -1.0 if number < 0 or number > _FOREVER else number
    raise invalid(f"{param} must be seconds or a duration such as '5m', '30s' or '1h' "
                  f"(-1 keeps the model loaded, 0 unloads it), got {value!r}", param)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__) + (
        f" ({value!r})" if isinstance(value, bool | int | float) or
        (isinstance(value, str) and len(value) < 40) else "")
