"""Ollama's request bodies as the gateway's, and Inferno's model facts as Ollama's.

Ollama's fields that Inferno cannot honour are refused with a 400 that says so
(images, thinking, fill-in-the-middle suffixes, templates and token contexts given
per request); the options that set up a model when Ollama loads it (``num_ctx``,
``num_gpu``, ``num_thread`` ...) are ignored, because Inferno sets them per model in
its profile. Anything else unknown is refused, so that a typo never goes unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from os import stat_result
from typing import Any

from inferno.plugins.gateway.bodies import require_object
from inferno.plugins.gateway.calls import Final
from inferno.plugins.gateway.errors import invalid
from inferno.plugins.models.errors import ModelNotFound
from inferno.plugins.models.formats import ModelFile

_GENERATION = frozenset({"model", "stream", "format", "options", "keep_alive", "think",
                         "logprobs", "top_logprobs"})
GENERATE_FIELDS = _GENERATION | {"prompt", "suffix", "system", "template", "context", "raw",
                                 "images", "width", "height", "steps"}
CHAT_FIELDS = _GENERATION | {"messages", "tools"}
EMBED_FIELDS = frozenset({"model", "input", "truncate", "options", "keep_alive", "dimensions"})
EMBEDDINGS_FIELDS = frozenset({"model", "prompt", "options", "keep_alive"})
SHOW_FIELDS = frozenset({"model", "name", "verbose", "system", "template", "options"})
MESSAGE_FIELDS = frozenset({"role", "content", "images", "tool_calls", "tool_name", "thinking",
                            "name", "tool_call_id"})

#: Ollama's options Inferno reads, and the gateway's field for each.
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "seed": "seed", "num_predict": "max_tokens", "stop": "stop",
           "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty"}
#: Set per model in Inferno's profile (context size, threads, GPU layers) or without effect.
IGNORED_OPTIONS = frozenset({"numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram",
                             "f16_kv", "logits_all", "vocab_only", "use_mmap", "use_mlock",
                             "embedding_only", "num_thread", "num_keep", "repeat_last_n",
                             "penalize_newline"})
#: Samplers Inferno does not have: accepted only at the value that turns them off.
NEUTRAL_OPTIONS = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0}
#: Refused when set: (the test that they are set, why they are refused).
_REFUSED = {
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "template": "a per-request template is not supported; set chat_template on the model's "
                "entry in the profile, or send raw: true with a formatted prompt",
    "context": "context (the token ids of an earlier answer) is not supported; send the "
               "conversation to /api/chat instead",
    "images": "images are not supported: Inferno's models read text",
    "logprobs": "logprobs are not supported", "top_logprobs": "logprobs are not supported",
    "width": "image generation is not supported", "height": "image generation is not supported",
    "steps": "image generation is not supported",
}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
          "h": 3600.0}


# --------------------------------------------------------------------------- requests


def checked(body: Any, known: frozenset[str]) -> Mapping[str, Any]:
    """``body`` as an object with only ``known`` fields."""
    body = require_object(body)
    unknown = sorted(set(body) - known)
    if unknown:
        raise invalid(f"unknown field {unknown[0]!r}; accepted fields: "
                      f"{', '.join(sorted(known))}", unknown[0], "unknown_field")
    return body


def generate_call(models: Any, body: Any) -> tuple[str, dict[str, Any]]:
    """``(operation, gateway body)`` for ``/api/generate``: a chat turn through the model's
    template, or with ``raw`` a completion of the prompt as given."""
    body = checked(body, GENERATE_FIELDS)
    _refuse(body, GENERATE_FIELDS)
    common = _common(models, body)
    prompt, system, raw = body.get("prompt"), body.get("system"), body.get("raw", False)
    for name, value in (("prompt", prompt), ("system", system)):
        if value is not None and not isinstance(value, str):
            raise invalid(f"{name} must be a string, got {kind(value)}", name)
    if not isinstance(raw, bool | None):
        raise invalid(f"raw must be true or false, got {kind(raw)}", "raw")
    if not prompt:
        return _load_or_unload(common)
    if raw:
        if system:
            raise invalid("system cannot be used with raw: true; write it into the prompt",
                          "system")
        return "completion", {**common, "prompt": prompt}
    messages = [{"role": "system", "content": system}] if system else []
    return "chat", {**common, "messages": [*messages, {"role": "user", "content": prompt}]}


def chat_call(models: Any, body: Any) -> tuple[str, dict[str, Any]]:
    """``(operation, gateway body)`` for ``/api/chat``."""
    body = checked(body, CHAT_FIELDS)
    _refuse(body, CHAT_FIELDS)
    common = _common(models, body)
    messages = body.get("messages")
    if messages is None or messages == []:
        return _load_or_unload(common)
    call = {**common, "messages": _messages(messages)}
    if body.get("tools"):
        call["tools"] = body["tools"]
    return "chat", call


def embed_call(models: Any, body: Mapping[str, Any], given: Any) -> dict[str, Any]:
    """The gateway's embeddings body for ``/api/embed`` (``truncate`` is the backend's
    own: ONNX encoders cut long inputs, GGUF models refuse them)."""
    options(body.get("options"))  # checked, then without effect on embeddings
    call = {"model": model_name(models, body.get("model")), "input": given}
    if body.get("dimensions") is not None:
        call["dimensions"] = body["dimensions"]
    if body.get("keep_alive") is not None:
        call["keep_alive"] = keep_alive(body["keep_alive"])
    return call


def stream_of(body: Mapping[str, Any]) -> bool:
    """Ollama streams unless told not to."""
    stream = body.get("stream")
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise invalid(f"stream must be true or false, got {kind(stream)}", "stream")
    return stream


def model_name(models: Any, name: Any) -> str:
    """The registered name: Ollama's clients add the tag ``:latest`` to bare names."""
    if not isinstance(name, str) or not name:
        raise invalid(f"model is required: a name from GET /api/tags, got {kind(name)}", "model")
    if name.endswith(":latest"):
        try:
            models.entry(name)
        except ModelNotFound:
            return name.removesuffix(":latest")
    return name


def options(value: Any) -> dict[str, Any]:
    """Ollama's ``options`` as the gateway's sampling fields."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise invalid(f"options must be an object, got {kind(value)}", "options")
    fields: dict[str, Any] = {}
    for name, setting in value.items():
        if setting is None or name in IGNORED_OPTIONS:
            continue
        if name in NEUTRAL_OPTIONS:
            if setting != NEUTRAL_OPTIONS[name]:
                raise invalid(f"options.{name} is not supported (only "
                              f"{NEUTRAL_OPTIONS[name]}, which turns it off), got {setting!r}",
                              f"options.{name}")
            continue
        if name not in OPTIONS:
            raise invalid(f"unknown option {name!r}; Inferno reads {', '.join(OPTIONS)} and "
                          f"ignores the load options ({', '.join(sorted(IGNORED_OPTIONS))})",
                          f"options.{name}", "unknown_field")
        if name != "num_predict":
            fields[OPTIONS[name]] = setting
        elif (limit := _num_predict(setting)) is not None:
            fields["max_tokens"] = limit
    return fields


def keep_alive(value: Any) -> float:
    """Seconds, from a number of seconds or a Go duration (``"5m"``, ``"1h30m"``); a negative
    value keeps the model loaded for good, 0 unloads it after the request."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return -1.0 if value < 0 else float(value)
    text = value.strip() if isinstance(value, str) else ""
    sign, digits = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    if digits == "0" or re.fullmatch(r"\d+(\.\d*)?", digits):
        return -1.0 if sign < 0 else float(digits)
    parts = _DURATION.findall(digits)
    if digits and "".join(n + u for n, u in parts) == digits:
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
        return -1.0 if sign < 0 else seconds
    raise invalid(f"keep_alive must be seconds or a duration such as '5m', '1h30m' or '30s' "
                  f"(negative keeps the model loaded, 0 unloads it), got {value!r}",
                  "keep_alive")


def _common(models: Any, body: Mapping[str, Any]) -> dict[str, Any]:
    common: dict[str, Any] = {"model": model_name(models, body.get("model")),
                              **options(body.get("options"))}
    response_format = _format(body.get("format"))
    if response_format is not None:
        common["response_format"] = response_format
    if body.get("keep_alive") is not None:
        common["keep_alive"] = keep_alive(body["keep_alive"])
    stream_of(body)
    return common


def _refuse(body: Mapping[str, Any], fields: frozenset[str]) -> None:
    for name, reason in _REFUSED.items():
        if name in fields and body.get(name) not in (None, "", [], False, 0):
            raise invalid(reason, name, "unsupported")
    think = body.get("think")
    if think not in (None, False):
        raise invalid(f"think is not supported: Inferno's models do not answer with separate "
                      f"thinking; leave it out or set it to false, got {think!r}", "think",
                      "unsupported")


def _load_or_unload(common: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Ollama loads a model for a request without a prompt, and unloads it when that
    request's ``keep_alive`` is 0."""
    if common.get("keep_alive") == 0:
        return "models.unload", {"model": common["model"]}
    return "models.load", {key: common[key] for key in ("model", "keep_alive") if key in common}


def _format(value: Any) -> dict[str, Any] | None:
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, Mapping):
        return {"type": "json_schema", "json_schema": {"name": "response",
                                                       "schema": dict(value)}}
    raise invalid(f"format must be \"json\" or a JSON Schema object, got {value!r}", "format")


def _num_predict(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"options.num_predict must be an integer, got {kind(value)}",
                      "options.num_predict")
    if value == 0:
        raise invalid("options.num_predict must be a positive number of tokens, or -1 for no "
                      "limit, got 0", "options.num_predict")
    return None if value < 0 else value


def _messages(value: Any) -> list[Any]:
    """Ollama's messages in the gateway's shape: tool calls with ids and their arguments as
    JSON text, each tool result tied to the call it answers (by ``tool_name``)."""
    if not isinstance(value, list):
        raise invalid(f"messages must be a list of {{role, content}} objects, got {kind(value)}",
                      "messages")
    pending: list[tuple[str, str]] = []  # (id, name) of calls not answered yet
    converted: list[Any] = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            converted.append(message)  # the gateway says what is wrong with it
            continue
        unknown = sorted(set(message) - MESSAGE_FIELDS)
        if unknown:
            raise invalid(f"{where} has an unknown field {unknown[0]!r}; accepted: "
                          f"{', '.join(sorted(MESSAGE_FIELDS))}", f"{where}.{unknown[0]}")
        if message.get("images"):
            raise invalid(f"{where}.images: images are not supported: Inferno's models read "
                          f"text", f"{where}.images", "unsupported")
        content = message.get("content")
        entry: dict[str, Any] = {"role": message.get("role"),
                                 "content": "" if content is None else content}
        if message.get("tool_calls"):
            entry["tool_calls"] = _tool_calls(message["tool_calls"], where, pending)
        if message.get("role") == "tool":
            name = message.get("tool_name") or message.get("name")
            answered = next((p for p in pending if p[1] == name), pending[0] if pending else None)
            if answered is not None:
                pending.remove(answered)
            entry["tool_call_id"] = message.get("tool_call_id") or (
                answered[0] if answered else f"call_{index}")
            if isinstance(name, str):
                entry["name"] = name
        converted.append(entry)
    return converted


def _tool_calls(calls: Any, where: str, pending: list[tuple[str, str]]) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise invalid(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    converted = []
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise invalid(f"{where}.tool_calls[{number}] must be {{function: {{name, "
                          f"arguments}}}}", f"{where}.tool_calls[{number}]")
        call_id = str(call.get("id") or f"call_{len(pending)}_{number}")
        arguments = function.get("arguments") or {}
        converted.append({"id": call_id, "type": "function", "function": {
            "name": function["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
        pending.append((call_id, function["name"]))
    return converted


# --------------------------------------------------------------------------- replies


def final_fields(final: Final, started: float) -> dict[str, Any]:
    """The last object's ``done`` fields: counts from the gateway's usage, durations in
    nanoseconds (prompt evaluation is the time to the first token, evaluation the decoding
    after it; the total is the wall time since the request arrived)."""
    usage = final.usage
    load = nanoseconds(usage.get("load_seconds"))
    prompt = nanoseconds(usage.get("time_to_first_token"))
    decode = nanoseconds(usage.get("decode_seconds"))
    parts = load + prompt + decode + nanoseconds(usage.get("queue_seconds"))
    return {"done": True, "done_reason": "length" if final.finish_reason == "length" else "stop",
            "total_duration": max(nanoseconds(time.perf_counter() - started), parts),
            "load_duration": load, "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
            "prompt_eval_duration": prompt,
            "eval_count": int(usage.get("completion_tokens") or 0), "eval_duration": decode}


def nanoseconds(seconds: Any) -> int:
    return max(0, round(float(seconds or 0.0) * 1e9))


def rfc3339(timestamp: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, UTC)
    return moment.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Facts:
    """What Ollama's model listings show, read from the model's file."""

    file: ModelFile
    stat: stat_result
    sha256: str


def facts(models: Any, name: str) -> Facts:
    """The file's header and stat (blocking: run in a thread)."""
    entry = models.entry(name)
    described = models.describe(name)
    stat = described.path.stat()
    # A file's own digest when the profile pins one; else one of its path, size and time,
    # which changes with the file without reading gigabytes for a listing.
    digest = entry.sha256.lower().removeprefix("sha256:") or hashlib.sha256(
        f"{described.path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return Facts(described, stat, digest)


def details(facts: Facts) -> dict[str, Any]:
    meta = facts.file.metadata
    family = meta.get("architecture") or facts.file.format
    count = meta.get("parameters")
    return {"parent_model": "", "format": facts.file.format, "family": family,
            "families": [family], "parameter_size": _human(count) if count else "",
            "quantization_level": str(meta.get("file_type") or "")}


def listing(name: str, facts: Facts) -> dict[str, Any]:
    """One model of ``/api/tags``."""
    return {"name": name, "model": name, "modified_at": rfc3339(facts.stat.st_mtime),
            "size": facts.file.size, "digest": facts.sha256, "details": details(facts)}


def shown(entry: Any, facts: Facts) -> dict[str, Any]:
    """``/api/show``'s answer."""
    meta = facts.file.metadata
    family = meta.get("architecture") or facts.file.format
    info: dict[str, Any] = {"general.architecture": family,
                            "general.parameter_count": meta.get("parameters"),
                            "general.file_type": meta.get("file_type")}
    for key, value in meta.items():
        if key not in ("architecture", "parameters", "file_type") and \
                isinstance(value, str | int | float | bool):
            info[f"{family}.{key}"] = value
    return {"modelfile": f"FROM {facts.file.path}\n", "license": "",
            "parameters": "\n".join(f"{key} {json.dumps(value)}"
                                    for key, value in entry.parameters.items()),
            "template": entry.chat_template or str(meta.get("chat_template") or ""),
            "details": details(facts), "model_info": info,
            "capabilities": capabilities(facts.file),
            "modified_at": rfc3339(facts.stat.st_mtime)}


def capabilities(file: ModelFile) -> list[str]:
    """``completion`` and ``tools`` for GGUF language models; ``embedding`` for an ONNX
    graph with token states or a sentence embedding and no classifier logits."""
    if file.format == "gguf":
        return ["completion", "tools"]
    outputs = {str(o.get("name")) for o in file.metadata.get("outputs") or ()
               if isinstance(o, Mapping)}
    if "logits" not in outputs and outputs & {"last_hidden_state", "sentence_embedding"}:
        return ["embedding"]
    return []


def process(row: Mapping[str, Any], resident: Any, facts: Facts) -> dict[str, Any]:
    """One loaded model of ``/api/ps``."""
    size = row.get("memory_bytes") or resident.current.reservation.amount
    return {"name": row["name"], "model": row["name"], "size": size, "digest": facts.sha256,
            "details": details(facts), "expires_at": _expires(resident),
            "size_vram": size if row.get("device") == "gpu" else 0,
            "context_length": resident.current.model.info.get("context_size")}


def _expires(resident: Any) -> str:
    """When the model is unloaded if no request comes: a century ahead when kept for good."""
    now = datetime.now(UTC)
    if resident.keep_alive < 0:
        return (now + timedelta(days=36525)).isoformat().replace("+00:00", "Z")
    idle = 0.0 if resident.current.inflight else time.monotonic() - resident.last_used
    left = min(max(0.0, resident.keep_alive - idle), 36525 * 86400.0)
    return (now + timedelta(seconds=left)).isoformat().replace("+00:00", "Z")


def _human(count: int) -> str:
    """A parameter count the way Ollama writes it: 268.10M, 8.0B."""
    for scale, unit, digits in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if count >= scale:
            number = count / scale
            return f"{number:.0f}{unit}" if number == int(number) else \
                f"{number:.{digits}f}{unit}"
    return str(count)


def kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
