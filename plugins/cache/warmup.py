"""Warm-up: requests the profile lists per model, run through the gateway once the
server is ready, so that their answers are cached before the first client asks.

``[plugins.cache] warmup`` maps a model to a list; each item is a prompt (a chat with one
user message) or a request body (``input`` makes it embeddings, ``prompt`` a completion,
``messages`` a chat; ``operation`` says so explicitly). A generation that sets neither
``temperature`` nor ``seed`` runs at temperature 0, the only kind worth caching. The calls
pass every middleware as the warm-up principal (role ``admin``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

from inferno.kernel import KernelHandle, Principal
from inferno.plugins.gateway.calls import Call, StreamReply

PRINCIPAL = Principal(id="system:cache-warmup", roles=frozenset({"admin"}),
                      attributes={"internal": True})


def requests(table: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(operation, body)`` for every item of the ``warmup`` table, in order."""
    for model, items in table.items():
        for item in items:
            if isinstance(item, str):
                yield "chat", {"model": model, "temperature": 0,
                               "messages": [{"role": "user", "content": item}]}
                continue
            body = {k: v for k, v in item.items() if k != "operation"}
            body["model"] = model
            operation = item.get("operation") or (
                "embeddings" if "input" in body else "completion" if "prompt" in body
                else "chat")
            if operation != "embeddings" and body.get("temperature") is None \
                    and body.get("seed") is None:
                body["temperature"] = 0
            yield str(operation), body


def problems(table: Any) -> list[tuple[str, str]]:
    """``(key, problem)`` for a ``warmup`` table of the wrong shape."""
    if not isinstance(table, Mapping):
        return [("", "must be a table of model = [prompts or request tables]")]
    found = []
    for model, items in table.items():
        if not isinstance(items, list | tuple) \
                or not all(isinstance(i, str | Mapping) for i in items):
            found.append((str(model), "must be a list of prompts or request tables"))
            continue
        for index, item in enumerate(items):
            operation = item.get("operation") if isinstance(item, Mapping) else None
            if operation not in (None, "chat", "completion", "embeddings"):
                found.append((f"{model}[{index}].operation",
                              f"must be chat, completion or embeddings, got {operation!r}"))
    return found


async def warm_up(kernel: KernelHandle, table: Mapping[str, Any],
                  log: structlog.typing.FilteringBoundLogger) -> dict[str, int]:
    """Run every warm-up request; log each outcome; ``{outcome: count}``."""
    gateway = kernel.service("gateway")
    counts = {"hit": 0, "miss": 0, "bypass": 0, "failed": 0}
    for operation, body in requests(table):
        started = time.perf_counter()
        call = Call(operation, body, protocol="warmup", principal=PRINCIPAL)
        try:
            reply = await gateway.run(call)
            if isinstance(reply, StreamReply):
                try:
                    await reply.collect()
                finally:
                    await reply.aclose()
        except Exception as exc:
            counts["failed"] += 1
            log.warning("warm-up request failed", model=body["model"], operation=operation,
                        error=str(exc))
            continue
        outcome = call.meta.get("cache", "bypass")
        counts[outcome] = counts.get(outcome, 0) + 1
        log.info("warm-up request", model=body["model"], operation=operation, cache=outcome,
                 seconds=round(time.perf_counter() - started, 3))
    return counts
