"""Key administration: the ``keys.*`` gateway operations and their ``/api/v1/keys`` routes.

:class:`KeyAdmin` does the work for both the gateway operations (so the HTTP routes, and
any other protocol, pass the same middlewares: authentication, the ``keys:manage``
permission) and the ``inferno keys`` commands. Each change is recorded in the audit log,
when the profile has one, before the answer goes out; the key itself never is.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from inferno.kernel import KernelHandle, Principal, get_logger
from inferno.plugins.gateway.bodies import require_object
from inferno.plugins.gateway.calls import Call, Operation, ValueReply
from inferno.plugins.gateway.errors import ApiError, invalid
from inferno.plugins.gateway.permissions import runs
from inferno.plugins.protocols.web import json_response, read_json, run_operation
from inferno.plugins.security.roles import ADMIN, Roles, allowed_models

from .keystore import (
    LIMIT_NAMES,
    KeyConflict,
    KeyNotFound,
    KeyStore,
    KeyStoreError,
    check_limits,
    parse_expiry,
)

PERMISSION = "keys:manage"
CREATE_FIELDS = frozenset({"name", "roles", "owner", "models", "expires", "limits"})
ROTATE_FIELDS = frozenset({"id", "expires"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}")
_MAX_TEXT = 200

log = get_logger("api_key")


@dataclass(frozen=True)
class Actor:
    """Who asks for a change, as the audit log records it."""

    principal: str | None
    source: str = ""
    request_id: str = ""

    @classmethod
    def of(cls, call: Call) -> Actor:
        return cls(principal=call.principal.id if call.principal else None,
                   source=str(call.state.get("client_ip") or call.credentials.peer),
                   request_id=call.id)


class KeyAdmin:
    """Lists, creates, revokes and rotates keys in the running ``api_key`` provider's store.

    Bodies are JSON objects as ``POST /api/v1/keys`` takes them; a bad one raises
    ``ApiError`` (400) naming the field in ``param``.
    """

    def __init__(self, kernel: KernelHandle) -> None:
        self.kernel = kernel

    @property
    def store(self) -> KeyStore:
        provider = self.kernel.drivers("auth").get("api_key")
        if provider is None:
            raise ApiError(503, "the api_key auth provider is not running", code="not_ready")
        return provider.store  # type: ignore[attr-defined, no-any-return]

    async def list_keys(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every key's record (never a key or a hash); revoked ones with
        ``include_revoked``."""
        _unknown(body, frozenset({"include_revoked"}))
        include = body.get("include_revoked", False)
        if not isinstance(include, bool):
            raise invalid(f"include_revoked must be true or false, got {include!r}",
                          "include_revoked")
        records = await asyncio.to_thread(self.store.list, include_revoked=include)
        return [record.public() for record in records]

    async def create(self, body: Mapping[str, Any], actor: Actor,
                     creator: Principal | None = None) -> dict[str, Any]:
        """A new key: its record and, this once, the key. A ``creator`` (the caller over
        HTTP) may give no more than it has: roles within its permissions, models within
        its allowlist."""
        _unknown(body, CREATE_FIELDS)
        name = _name(body.get("name"))
        roles = self._roles(body.get("roles"))
        owner = _text(body.get("owner", actor.principal or ""), "owner")
        models = _names(body.get("models", []), "models")
        if creator is not None:
            self.within_reach(creator, roles, models)
        limits = _limits(body.get("limits", {}))
        expires_at = _expiry(body.get("expires"))
        record, key = await self._store_call(
            lambda: self.store.create(name, roles=roles, owner=owner, models=models,
                                      limits=limits, expires_at=expires_at))
        await self._audit("keys.create", actor, record.id, {
            "name": record.name, "roles": list(record.roles), "owner": record.owner},
            undo=lambda: self.store.withdraw(record))
        return {**record.public(), "key": key}

    async def revoke(self, body: Mapping[str, Any], actor: Actor) -> dict[str, Any]:
        """Revoke the key ``id`` (an id, or the name of an unrevoked key)."""
        _unknown(body, frozenset({"id"}))
        record = await self._store_call(lambda: self.store.revoke(_ref(body)))
        await self._audit("keys.revoke", actor, record.id, {"name": record.name})
        return record.public()

    async def rotate(self, body: Mapping[str, Any], actor: Actor,
                     creator: Principal | None = None) -> dict[str, Any]:
        """Replace the key ``id`` with a new one of the same attributes; the old key is
        revoked at once. ``expires`` gives the new key another expiry. A ``creator`` may
        only rotate keys it could have created."""
        _unknown(body, ROTATE_FIELDS)
        ref = _ref(body)
        if creator is not None:
            current = await self._store_call(lambda: self.store.get(ref))
            self.within_reach(creator, list(current.roles), list(current.models))
        expires_at: float | Literal["keep"] | None = \
            _expiry(body["expires"]) if "expires" in body else "keep"
        new, key, old = await self._store_call(
            lambda: self.store.rotate(ref, expires_at=expires_at))
        await self._audit("keys.rotate", actor, old.id, {
            "name": old.name, "new_key_id": new.id}, undo=lambda: self.store.withdraw(new))
        return {**new.public(), "key": key, "replaces": old.id}

    def within_reach(self, creator: Principal, roles: list[str], models: list[str]) -> None:
        """Refuse (403) a key that would give more than ``creator`` has itself."""
        table = Roles(self.kernel.config.get("security", {}).get("roles", {}))
        mine = table.permissions(creator)
        if ADMIN not in mine:
            wanted = set().union(*(table.table.get(role, frozenset()) for role in roles))
            beyond = sorted(wanted - mine)
            if beyond:
                raise ApiError(403, f"{creator.id} may not hand out roles {roles}: they grant "
                                    f"{', '.join(beyond)}, which it does not have",
                               param="roles", code="permission_denied")
        allowed = allowed_models(creator)
        if allowed is not None and (not models or not set(models) <= allowed):
            raise ApiError(403, f"{creator.id} may use only {', '.join(sorted(allowed))}; a "
                                f"key it makes must name models among them", param="models",
                           code="model_not_allowed")

    def _roles(self, value: Any) -> list[str]:
        roles = _names(value, "roles")
        if not roles:
            raise invalid("roles must name at least one role", "roles")
        known = known_roles(self.kernel.config)
        unknown = sorted(set(roles) - known) if known is not None else []
        if unknown:
            raise invalid(f"unknown role {unknown[0]!r}; the roles defined are "
                          f"{', '.join(sorted(known or ()))} (security.roles)", "roles",
                          "unknown_role")
        return roles

    async def _store_call(self, work: Callable[[], Any]) -> Any:
        """A store method in a thread (a write may wait for another process's lock), its
        errors as the caller reads them."""
        try:
            return await asyncio.to_thread(work)
        except KeyNotFound as exc:
            raise ApiError(404, str(exc), param="id", code="key_not_found") from None
        except KeyConflict as exc:
            raise ApiError(409, str(exc), code="key_conflict") from None
        except KeyStoreError as exc:
            raise ApiError(503, str(exc), code="key_store_unavailable", retry_after=1) from None

    async def _audit(self, action: str, actor: Actor, resource: str,
                     details: Mapping[str, Any], undo: Callable[[], None] | None = None
                     ) -> None:
        """Record ``action`` before answering. When the audit log cannot be written and
        fails closed, a new key is withdrawn (nobody saw it) and the call fails with 503."""
        try:
            audit = self.kernel.service("audit")
        except LookupError:
            return
        try:
            await audit.record(action, "ok", principal=actor.principal, source=actor.source,
                               request_id=actor.request_id, resource=resource,
                               details=dict(details))
        except Exception as exc:
            if not getattr(audit, "fail_closed", True):
                log.error("audit record lost", action=action, key_id=resource, error=str(exc))
                return
            log.error("audit log unwritable", action=action, key_id=resource, error=str(exc))
            if undo is None:  # a revocation: undoing it would be worse than not auditing it
                message = ("the key is revoked, but the audit log cannot be written to "
                           "record it (audit.fail_closed)")
            else:
                await asyncio.to_thread(undo)
                message = (f"the audit log cannot be written, so {action} is refused until "
                           f"it can (audit.fail_closed)")
            raise ApiError(503, message, code="audit_unavailable", retry_after=5) from None


def known_roles(config: Mapping[str, Any]) -> frozenset[str] | None:
    """The role names a key may carry: the ``security`` plugin's built-in roles and those
    ``[security] roles`` defines; ``None`` (any) when that plugin is not loaded."""
    security = config.get("security")
    if not isinstance(security, Mapping):
        return None
    from inferno.plugins.security.roles import role_table

    configured = security.get("roles", {})
    return frozenset(role_table(configured if isinstance(configured, Mapping) else {}))


# --------------------------------------------------------------------------- bodies


def _unknown(body: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise invalid(f"unknown field {unknown[0]!r}; accepted fields: "
                      f"{', '.join(sorted(known))}", unknown[0], "unknown_field")


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise invalid(f"name must be 1 to 64 letters, digits and . _ @ : - (starting with a "
                      f"letter or digit), got {value!r}", "name")
    return value


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise invalid(f"{field} must be a string of at most {_MAX_TEXT} characters", field)
    return value


def _names(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(
            isinstance(item, str) and item.strip() and len(item) <= _MAX_TEXT for item in value):
        raise invalid(f"{field} must be a list of names", field)
    return list(dict.fromkeys(item.strip() for item in value))


def _limits(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise invalid(f"limits must be an object with any of {', '.join(LIMIT_NAMES)}",
                      "limits")
    for name, amount in value.items():
        try:
            check_limits({name: amount})
        except KeyStoreError as exc:
            raise invalid(str(exc), f"limits.{name}") from None
    return check_limits(value)


def _expiry(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"expires must be a duration like '30d' or an ISO time, got {value!r}",
                      "expires")
    try:
        return parse_expiry(value)
    except KeyStoreError as exc:
        raise invalid(str(exc), "expires") from None


def _ref(body: Mapping[str, Any]) -> str:
    ref = body.get("id")
    if not isinstance(ref, str) or not ref:
        raise invalid("id must name a key (its id, or the name of an unrevoked key)", "id")
    return ref


# --------------------------------------------------------------------------- gateway, HTTP


def operations(kernel: KernelHandle) -> dict[str, tuple[Operation, str]]:
    """The ``keys.*`` operations, each needing ``keys:manage``."""
    admin = KeyAdmin(kernel)

    async def list_keys(call: Call) -> ValueReply:
        return ValueReply(await admin.list_keys(require_object(call.body)))

    async def create_key(call: Call) -> ValueReply:
        return ValueReply(await admin.create(require_object(call.body), Actor.of(call),
                                             call.principal))

    async def revoke_key(call: Call) -> ValueReply:
        return ValueReply(await admin.revoke(require_object(call.body), Actor.of(call)))

    async def rotate_key(call: Call) -> ValueReply:
        return ValueReply(await admin.rotate(require_object(call.body), Actor.of(call),
                                             call.principal))

    return {"keys.list": (list_keys, PERMISSION), "keys.create": (create_key, PERMISSION),
            "keys.revoke": (revoke_key, PERMISSION), "keys.rotate": (rotate_key, PERMISSION)}


def routes(kernel: KernelHandle) -> list[web.RouteDef]:
    """``/api/v1/keys``: list, create, revoke and rotate through the gateway."""

    async def run(request: web.Request, operation: str, body: Mapping[str, Any]) -> Any:
        return await run_operation(kernel, request, operation, body)

    @runs("keys.list")
    async def list_keys(request: web.Request) -> web.Response:
        """Every API key: id, name, owner, roles, models, limits, status and times, never
        the key. ``?include_revoked=true`` lists revoked keys too."""
        include = request.query.get("include_revoked", "false").lower() in ("true", "1")
        return json_response({"keys": await run(request, "keys.list",
                                                {"include_revoked": include})})

    @runs("keys.create")
    async def create_key(request: web.Request) -> web.Response:
        """Create an API key (name, roles, owner, models, expires, limits). The answer
        holds the key: it is shown this once and cannot be read again."""
        body = require_object(await read_json(request))
        return _secret(json_response(await run(request, "keys.create", body), status=201))

    @runs("keys.revoke")
    async def revoke_key(request: web.Request) -> web.Response:
        """Revoke an API key by id (or by the name of an unrevoked key); every Inferno
        process sharing the key store refuses it from its next request on."""
        ref = request.match_info["id"]
        return json_response(await run(request, "keys.revoke", {"id": ref}))

    @runs("keys.rotate")
    async def rotate_key(request: web.Request) -> web.Response:
        """Replace an API key with a new one of the same name, roles, models and limits;
        the old key is revoked at once. Optional body: ``{"expires": "30d"}``."""
        body = dict(require_object(await read_json(request))) if request.body_exists else {}
        body["id"] = request.match_info["id"]
        return _secret(json_response(await run(request, "keys.rotate", body)))

    return [web.get("/api/v1/keys", list_keys), web.post("/api/v1/keys", create_key),
            web.delete("/api/v1/keys/{id}", revoke_key),
            web.post("/api/v1/keys/{id}/rotate", rotate_key)]


def _secret(response: web.Response) -> web.Response:
    """An answer that carries a key is stored by no cache or proxy."""
    response.headers["Cache-Control"] = "no-store"
    return response
