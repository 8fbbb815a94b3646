"""The gateway middleware that admits calls within their caller's limits (order 300).

It runs after authentication (200), so it knows the principal and the client address,
and before the response cache (400), so a cached answer still counts as a request. Not
counted: a call that needs no permission (``PUBLIC``: health checks, the OpenAPI
document), and an ``access`` check that only asks who the caller is (``AUTHENTICATED``):
a protocol makes one before a route's operations, which are counted themselves, and for
WebSocket pings and cancels. An ``access`` check for a route that runs no operation
needs a permission of its own, and counts as that route's request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from inferno.kernel.logs import get_logger
from inferno.plugins.gateway.calls import Call, Handler, StreamReply, ValueReply
from inferno.plugins.gateway.errors import ApiError
from inferno.plugins.gateway.permissions import AUTHENTICATED, PUBLIC

from .limits import LimitPolicy, Limits
from .stores import Refusal, StorageUnavailable, Store

log = get_logger("rate_limits")

#: What each refused limit is called in the message a client reads.
_UNITS = {"requests": "requests per minute", "tokens": "tokens per minute",
          "concurrent": "calls at once"}
#: Seconds between two warnings that the store is unavailable (a flood of calls would
#: otherwise write one line each).
_WARN_EVERY = 10.0
#: Seconds a client is told to wait when the store cannot be asked.
STORAGE_RETRY_AFTER = 5


class RateLimitMiddleware:
    """Takes a request and a slot before the call, charges its tokens after it."""

    order = 300

    def __init__(self, policy: LimitPolicy, store: Store, *, fail_open: bool = False) -> None:
        self.policy = policy
        self.store = store
        self.fail_open = fail_open
        self._warned = -math.inf

    async def __call__(self, call: Call, handler: Handler) -> Any:
        if call.permission == PUBLIC or (call.permission == AUTHENTICATED
                                         and call.operation == "access"):
            return await handler(call)
        address = call.state.get("client_ip") or call.credentials.peer
        owner, limits = self.policy.caller(call.principal, address)
        if limits.unlimited:
            return await handler(call)
        try:
            lease = await self.store.admit(owner, limits)
        except Refusal as refusal:
            raise refused(refusal, call, address) from None
        except StorageUnavailable as exc:
            self._warn(str(exc))
            if self.fail_open:
                return await handler(call)
            raise ApiError(503, "rate limits cannot be checked right now, so this server "
                                "refuses calls until they can (rate_limits.on_storage_error)",
                           code="rate_limit_unavailable",
                           retry_after=STORAGE_RETRY_AFTER) from None
        try:
            reply = await handler(call)
        except BaseException:
            await self._finish(owner, limits, lease, 0)
            raise
        if isinstance(reply, StreamReply):
            async def closed() -> None:
                final = reply.final
                await self._finish(owner, limits, lease,
                                   used_tokens(final.usage) if final is not None
                                   else reply.streamed_tokens)
            reply.on_close(closed)
        else:
            value = reply.value if isinstance(reply, ValueReply) else None
            usage = value.get("usage") if isinstance(value, Mapping) else None
            await self._finish(owner, limits, lease, used_tokens(usage))
        return reply

    async def _finish(self, owner: str, limits: Limits, lease: str, tokens: int) -> None:
        try:
            await self.store.finish(owner, limits, lease, tokens)
        except StorageUnavailable as exc:  # the call is done: its lease expires on its own
            self._warn(str(exc))

    def _warn(self, error: str) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            log.warning("rate limit storage unavailable", error=error,
                        calls="let through" if self.fail_open else "refused")


def refused(refusal: Refusal, call: Call, address: str) -> ApiError:
    """The 429 a client reads: which limit, whose, and when to come back."""
    wait = max(1, math.ceil(refusal.reset))
    principal = call.principal
    if principal is None or principal.attributes.get("anonymous"):
        whose = f"anonymous callers from {address or 'this address'}"
    else:
        whose = principal.id
    if refusal.kind == "concurrent":
        when = "when one of them finishes"
    elif refusal.kind == "tokens":
        when = f"in {wait} s, once earlier calls' tokens are paid off"
    else:
        when = f"in {wait} s"
    unit = "call at once" if refusal.limit == 1 and refusal.kind == "concurrent" \
        else _UNITS[refusal.kind]
    message = f"rate limit reached: {refusal.limit} {unit} for {whose}; try again {when}"
    return ApiError(429, message, code="rate_limited", retry_after=wait, headers={
        "X-RateLimit-Limit": str(refusal.limit),
        "X-RateLimit-Remaining": str(max(0, refusal.remaining)),
        "X-RateLimit-Reset": str(wait)})


def used_tokens(usage: Any) -> int:
    """Prompt plus completion tokens a reply's usage reports (0 when it reports none)."""
    if not isinstance(usage, Mapping):
        return 0
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool):
        return max(0, total)
    parts = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
    return sum(max(0, part) for part in parts if isinstance(part, int))
