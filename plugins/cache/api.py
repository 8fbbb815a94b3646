"""Cache administration: the ``cache.stats`` and ``cache.clear`` gateway operations and
their routes, ``GET /api/v1/cache`` and ``DELETE /api/v1/cache?tier=&model=``.

Both need the ``cache:manage`` permission and pass the same middlewares as every call
(authentication, the audit record ``cache:manage`` calls get, rate limits).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from inferno.kernel import KernelHandle
from inferno.plugins.gateway.bodies import require_object
from inferno.plugins.gateway.calls import Call, Operation, ValueReply
from inferno.plugins.gateway.errors import ApiError, invalid
from inferno.plugins.gateway.permissions import runs
from inferno.plugins.protocols.web import json_response, run_operation

PERMISSION = "cache:manage"
CLEAR_FIELDS = frozenset({"tier", "model"})


def canonical_model(kernel: KernelHandle, name: str) -> str:
    """The registered name for ``name`` (an alias, say); ``name`` itself for a model no
    longer registered, whose entries may still be cached."""
    try:
        return str(kernel.service("models").entry(name).name)
    except Exception:
        return name


def operations(kernel: KernelHandle) -> dict[str, tuple[Operation, str]]:
    from .plugin import service

    async def stats(call: Call) -> ValueReply:
        cache = service(kernel)
        return ValueReply({"tiers": await cache.fresh_stats(), "calls": dict(cache.outcomes)})

    async def clear(call: Call) -> ValueReply:
        body = require_object(call.body)
        unknown = sorted(set(body) - CLEAR_FIELDS)
        if unknown:
            raise invalid(f"unknown field {unknown[0]!r}; accepted fields: tier, model",
                          unknown[0], "unknown_field")
        tier, model = body.get("tier") or None, body.get("model") or None
        for field, value in (("tier", tier), ("model", model)):
            if value is not None and not isinstance(value, str):
                raise invalid(f"{field} must be a name, got {value!r}", field)
        if model is not None:
            model = canonical_model(kernel, model)
        try:
            removed = await service(kernel).clear(tier=tier, model=model)
        except LookupError as exc:
            raise ApiError(404, str(exc), param="tier", code="unknown_tier") from None
        return ValueReply({"removed": removed, "model": model})

    return {"cache.stats": (stats, PERMISSION), "cache.clear": (clear, PERMISSION)}


def routes(kernel: KernelHandle) -> list[web.RouteDef]:
    async def run(request: web.Request, operation: str, body: Mapping[str, Any]) -> Any:
        return await run_operation(kernel, request, operation, body)

    @runs("cache.stats")
    async def cache_stats(request: web.Request) -> web.Response:
        """The response cache: per tier (in lookup order) hits, misses, evictions, bytes and
        entries; and how many calls this process answered as hit, miss and bypass."""
        return json_response(await run(request, "cache.stats", {}))

    @runs("cache.clear")
    async def cache_clear(request: web.Request) -> web.Response:
        """Remove cached answers: all of them, ``?tier=`` one tier's, ``?model=`` one
        model's (by name or alias), or both. Answers how many each tier removed."""
        body = {k: request.query[k] for k in ("tier", "model") if request.query.get(k)}
        return json_response(await run(request, "cache.clear", body))

    return [web.get("/api/v1/cache", cache_stats), web.delete("/api/v1/cache", cache_clear)]
