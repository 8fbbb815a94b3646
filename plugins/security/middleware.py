"""The gateway middleware that admits calls: network policy, authentication through the
profile's auth providers in order, the permission the call needs, the models the caller
may use, and audit records of all of it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from inferno.kernel import AuthError, AuthProvider, KernelHandle, Principal
from inferno.kernel.logs import get_logger
from inferno.plugins.gateway.calls import Call, Handler, ValueReply
from inferno.plugins.gateway.errors import ApiError
from inferno.plugins.gateway.permissions import PUBLIC

from .network import NetworkPolicy
from .roles import Roles, allowed_models

#: Calls whose outcome is recorded in the audit log by this middleware (the ``keys.*``
#: operations record their own, with the key's id).
AUDITED_PERMISSIONS = frozenset({"models:manage", "cache:manage", "batch:submit", "admin"})
#: Operations whose body names a model the caller must be allowed to use.
MODEL_OPERATIONS = frozenset({"chat", "completion", "embeddings", "models.get", "models.load",
                              "models.unload", "models.rollback", "cache.clear"})
#: Operations whose ``keep_alive`` sets how long a model stays loaded (0 unloads it, -1 pins
#: it): managing models, not using them.
KEEP_ALIVE_OPERATIONS = frozenset({"chat", "completion", "embeddings"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="inferno"'}
#: Authentication failures recorded per source address and minute; the rest are counted
#: and the count goes into the next record, so a flood of bad credentials cannot fill the disk.
FAILURES_PER_MINUTE = 30

log = get_logger("security")


class SecurityMiddleware:
    """Runs at order 200, after observability and before rate limits and the cache."""

    order = 200

    def __init__(self, kernel: KernelHandle, config: Mapping[str, Any]) -> None:
        self.kernel = kernel
        self.policy = NetworkPolicy(config["allow"], config["deny"], config["trusted_proxies"])
        self.roles = Roles(config["roles"])
        self.audit_successes = bool(config["audit_successes"])
        providers = [(name, driver) for name, driver in kernel.drivers("auth").items()
                     if isinstance(driver, AuthProvider)]
        # a provider that admits every caller would leave the ones after it unasked
        self.providers: list[tuple[str, AuthProvider]] = sorted(
            providers, key=lambda item: bool(getattr(item[1], "admits_everyone", False)))
        #: source address → (window start, records in it, records left out)
        self._failures: dict[str, tuple[float, int, int]] = {}
        if not self.providers:
            log.warning("no auth provider is enabled: every call that needs a permission is "
                        "refused (401); add [auth.none] (loopback only) or [auth.api_key]")

    async def __call__(self, call: Call, handler: Handler) -> Any:
        client = self.policy.client(call.credentials)
        call.state["client_ip"] = client
        if not self.policy.admits(client, call.credentials.peer):
            await self.record(call, "network.denied", "denied", resource=client)
            raise ApiError(403, f"calls from {client} are not allowed here "
                                f"(security.allow and security.deny)", code="address_denied")
        if call.permission == PUBLIC:
            return await handler(call)
        if call.principal is None:
            call.principal = await self.authenticate(call)
        await self.authorize(call, call.principal)
        if call.permission not in AUDITED_PERMISSIONS:
            return await self.filtered(call, await handler(call))
        try:
            reply = await handler(call)
        except ApiError as exc:
            await self.record(call, call.operation, "failed", resource=call.model or "",
                              details={"status": exc.status, "code": exc.code})
            raise
        await self.record(call, call.operation, "ok", resource=call.model or "")
        return reply

    # ------------------------------------------------------------------ the steps

    async def authenticate(self, call: Call) -> Principal:
        """The principal the first provider that recognises the credentials vouches for."""
        for name, provider in self.providers:
            try:
                principal = await provider.authenticate(call.credentials)
            except AuthError as exc:
                await self.record_failure(call, {"provider": name, "reason": str(exc)})
                raise ApiError(401, str(exc), code="invalid_credentials",
                               headers=CHALLENGE) from None
            if principal is not None:
                if self.audit_successes and not _housekeeping(call):
                    await self.record(call, "auth.success", "ok", principal=principal,
                                      details={"provider": name})
                return principal
        await self.record_failure(call, {"reason": "no credentials a provider accepts"})
        if not self.providers:
            message = ("this server has no auth provider enabled, so it admits nobody: "
                       "its profile needs [auth.api_key], [auth.jwt] or [auth.none]")
        else:
            message = ("credentials required: send 'Authorization: Bearer <key>' or "
                       "'X-API-Key: <key>'")
        raise ApiError(401, message, code="missing_credentials", headers=CHALLENGE)

    async def authorize(self, call: Call, principal: Principal) -> None:
        if not self.roles.grants(principal, call.permission):
            await self.record(call, "authz.denied", "denied", principal=principal,
                              resource=call.operation,
                              details={"permission": call.permission})
            roles = ", ".join(sorted(principal.roles)) or "none"
            raise ApiError(403, f"{principal.id} (roles: {roles}) may not {call.operation}: "
                                f"that needs the permission {call.permission!r}",
                           code="permission_denied")
        if call.operation in KEEP_ALIVE_OPERATIONS and isinstance(call.body, Mapping) \
                and call.body.get("keep_alive") is not None \
                and not self.roles.grants(principal, "models:manage"):
            await self.record(call, "authz.denied", "denied", principal=principal,
                              resource=call.model or "", details={"reason": "keep_alive"})
            raise ApiError(403, f"{principal.id} may not set keep_alive: how long a model "
                                f"stays loaded is for callers with the permission "
                                f"'models:manage'; leave the field out", param="keep_alive",
                           code="permission_denied")
        allowed = allowed_models(principal)
        if allowed is None or call.operation not in MODEL_OPERATIONS:
            return
        named = call.model or call.body.get("name")
        if isinstance(named, str) and not self._model_allowed(named, allowed):
            await self.record(call, "authz.denied", "denied", principal=principal,
                              resource=named, details={"reason": "model not allowed"})
            raise ApiError(403, f"{principal.id} may not use model {named!r}; it may use "
                                f"{', '.join(sorted(allowed))}", param="model",
                           code="model_not_allowed")

    def _model_allowed(self, name: str, allowed: frozenset[str]) -> bool:
        if name in allowed:
            return True
        try:  # an alias of an allowed model, or the model an allowed alias names
            canonical = self.kernel.service("models").entry(name).name
        except Exception:
            return False
        return canonical in allowed

    async def filtered(self, call: Call, reply: Any) -> Any:
        """A model list and the status show a principal with a model allowlist only its
        models."""
        allowed = allowed_models(call.principal) if call.principal else None
        if allowed is None or not isinstance(reply, ValueReply):
            return reply
        if call.operation == "models.list" and isinstance(reply.value, list):
            reply.value = [row for row in reply.value if isinstance(row, Mapping)
                           and (row.get("name") in allowed
                                or set(row.get("aliases") or ()) & allowed)]
        elif call.operation == "status" and isinstance(reply.value, Mapping):
            value = dict(reply.value)
            value["loaded"] = [row for row in value.get("loaded", ())
                               if self._model_allowed(str(row.get("name")), allowed)]
            value["queues"] = {name: stats for name, stats in value.get("queues", {}).items()
                               if self._model_allowed(name, allowed)}
            reply.value = value
        return reply

    # ------------------------------------------------------------------ the audit log

    async def record_failure(self, call: Call, details: dict[str, Any]) -> None:
        """An ``auth.failure`` record, at most ``FAILURES_PER_MINUTE`` per source address a
        minute; the ones left out are counted in the next (``suppressed``)."""
        source = str(call.state.get("client_ip") or call.credentials.peer)
        now = time.monotonic()
        started, count, suppressed = self._failures.get(source, (now, 0, 0))
        if now - started >= 60:
            started, count = now, 0
        if count >= FAILURES_PER_MINUTE:
            self._failures[source] = (started, count, suppressed + 1)
            return
        if len(self._failures) > 10_000:  # a flood of addresses: forget the oldest windows
            self._failures = dict(sorted(self._failures.items(), key=lambda i: i[1][0])[-5000:])
        self._failures[source] = (started, count + 1, 0)
        if suppressed:
            details = {**details, "suppressed": suppressed}
        await self.record(call, "auth.failure", "denied", details=details)

    async def record(self, call: Call, action: str, outcome: str, *,
                     principal: Principal | None = None, resource: str = "",
                     details: Mapping[str, Any] | None = None) -> None:
        """Write an audit record before the call goes on. When the log cannot be written
        and the audit plugin fails closed, the call is refused (503)."""
        try:
            audit = self.kernel.service("audit")
        except LookupError:
            return
        who = principal or call.principal
        try:
            await audit.record(action, outcome, principal=who.id if who else None,
                               source=str(call.state.get("client_ip") or call.credentials.peer),
                               request_id=call.id, resource=resource,
                               details={"protocol": call.protocol, **(details or {})})
        except Exception as exc:
            if not getattr(audit, "fail_closed", True):
                log.error("audit record lost", action=action, error=str(exc))
                return
            log.error("audit log unwritable: call refused", action=action, error=str(exc))
            raise ApiError(503, "the audit log cannot be written, so this server refuses "
                                "calls until it can (audit.fail_closed)",
                           code="audit_unavailable", retry_after=5) from None


def _housekeeping(call: Call) -> bool:
    """A WebSocket ping, cancel or unsubscribe: checked like any call, but too frequent and
    too empty to be worth an ``auth.success`` record each (the upgrade has one)."""
    return call.operation == "access" and call.protocol == "websocket" \
        and call.state.get("message") is not None
