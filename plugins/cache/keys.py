"""Cache keys: what makes two requests the same request, and which ones may be cached.

A key is the blake3 digest of a canonical JSON form (sorted keys, no spaces, whole floats
written as integers) of: the model's identity (its registered name, the checksum of its
file and every entry setting that changes its output), the operation, the normalised
messages, prompt or input, and every parameter that changes the output. What changes only
the delivery (``stream``, ``stream_options``, ``keep_alive``, ``user``, ``cache``) is left
out, so a streamed and a plain request share an entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from inferno.plugins.gateway.bodies import parse_chat, parse_completion, parse_embeddings

from .tiers import SEPARATOR

#: The operations the cache serves.
OPERATIONS = frozenset({"chat", "completion", "embeddings"})
#: Bumped when the stored form changes, so old entries are never read as new ones.
FORMAT = 1


def canonical(value: Any) -> bytes:
    """``value`` as the one JSON text every equal value has."""
    return json.dumps(_normal(value), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def _normal(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _normal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # temperature 0 and 0.0 are one request
    return value


def make_key(model: str, material: Mapping[str, Any]) -> bytes:
    """``<model>/<blake3 hex>``: the model's name first, so tiers find its entries."""
    return model.encode() + SEPARATOR + blake3.blake3(canonical(material)).hexdigest().encode()


@dataclass(frozen=True)
class Request:
    """What the cache needs of one call: the parsed plan's output-changing parts."""

    model: str  # the name the body gives (an alias, maybe)
    operation: str
    material: Mapping[str, Any]
    #: Whether the same request always gets the same answer.
    deterministic: bool


def describe(operation: str, body: Mapping[str, Any]) -> Request:
    """The request's cacheable form; ``ApiError`` (400) for a body the gateway would refuse
    too (the caller then lets the gateway report it)."""
    if operation == "embeddings":
        plan = parse_embeddings(body)
        return Request(plan.model, operation, {
            "input": list(plan.inputs), "encoding_format": plan.encoding_format,
            "dimensions": plan.extra.get("dimensions")}, deterministic=True)
    generation = parse_chat(body) if operation == "chat" else parse_completion(body)
    material: dict[str, Any] = {"params": dict(generation.params)}
    if operation == "chat":
        material["messages"] = [dict(m) for m in generation.messages or ()]
        if generation.tools is not None:
            material["tools"] = {name: body.get(name) for name in
                                 ("tools", "tool_choice", "parallel_tool_calls")}
    else:
        material["prompt"] = generation.prompt
    params = generation.params
    deterministic = params.get("temperature") == 0 or params.get("seed") is not None
    return Request(generation.model, operation, material, deterministic)


def deterministic_with(request: Request, defaults: Mapping[str, Any]) -> bool:
    """Whether the request is deterministic once the model entry's default ``parameters``
    fill what it leaves out (an entry may set temperature 0 for every request)."""
    if request.deterministic or request.operation == "embeddings":
        return True
    params = {**defaults, **request.material.get("params", {})}
    return params.get("temperature") == 0 or params.get("seed") is not None


class Identities:
    """Models' identities, with the checksum of each file computed once per version.

    A pinned ``sha256`` is the identity as given (the model manager refuses a file that does
    not match it). Otherwise the file's SHA-256 comes from the model manager's checksum
    database (kept against path, size and modification time, so across restarts too),
    hashed in a worker thread the first time; here it is remembered per (path, size,
    mtime_ns), so a request costs one ``stat``. A replaced file gets a new identity.
    """

    def __init__(self, models: Callable[[], Any]) -> None:
        #: The model manager, asked for when a file is hashed (it starts after the cache).
        self.models = models
        self._sums: dict[tuple[str, int, int], str] = {}
        self._pending: dict[tuple[str, int, int], asyncio.Future[str]] = {}

    async def of(self, entry: Any) -> dict[str, Any]:
        return {"format": FORMAT, "name": entry.name, "checksum": await self.checksum(entry),
                "backend": entry.backend, "file_format": entry.format,
                "parameters": dict(entry.parameters), "chat_template": entry.chat_template,
                "system_prompt": entry.system_prompt, "options": dict(entry.options)}

    async def checksum(self, entry: Any) -> str:
        pinned = str(entry.sha256).strip().lower().removeprefix("sha256:")
        if pinned:
            return pinned
        path = Path(entry.require_path())
        stat = os.stat(path)
        version = (str(path), stat.st_size, stat.st_mtime_ns)
        known = self._sums.get(version)
        if known is not None:
            return known
        pending = self._pending.get(version)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._hash, path))
            self._pending[version] = pending
        try:
            digest = await asyncio.shield(pending)
        finally:
            if pending.done():
                self._pending.pop(version, None)
        self._sums = {v: s for v, s in self._sums.items() if v[0] != version[0]}
        self._sums[version] = digest
        return digest

    def _hash(self, path: Path) -> str:
        checksums = getattr(self.models(), "checksums", None)
        if checksums is not None:
            return str(checksums.sha256(path))
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while block := file.read(1024 * 1024):
                digest.update(block)
        return digest.hexdigest()
