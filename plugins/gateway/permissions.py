"""What each operation and route needs: permissions, and how routes declare theirs.

Every gateway operation has a permission (``add_operation(..., permission=...)``); the
authentication middleware refuses a call whose principal's roles do not grant it. An HTTP
route either says which operations it runs (``@runs("chat")``: the gateway checks them) or
the permission it needs itself (``@requires("authenticated")``, ``@public``): the HTTP
server refuses to serve a route that says neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: Anyone, with or without credentials (the network policy still applies).
PUBLIC = "public"
#: Any caller a provider vouched for, whatever its roles.
AUTHENTICATED = "authenticated"

#: The permissions Inferno's own operations use, with what they allow. Roles grant them.
PERMISSIONS: dict[str, str] = {
    "models:read": "list models and read their details",
    "models:manage": "load, unload, roll back, install and update models",
    "infer": "chat and text completions",
    "embed": "embeddings",
    "batch:submit": "submit batch jobs",
    "batch:read": "read batch jobs and their results",
    "cache:manage": "inspect and clear the response cache",
    "keys:manage": "create, list, revoke and rotate API keys",
    "audit:read": "query the audit log",
    "metrics:read": "read metrics and the server status",
    "events:read": "subscribe to the kernel's events",
    "admin": "everything",
}


def runs(*operations: str) -> Callable[[F], F]:
    """Mark a route handler as one that runs these gateway operations (which check
    their own permissions)."""

    def mark(handler: F) -> F:
        handler.operations = operations  # type: ignore[attr-defined]
        return handler

    return mark


def requires(permission: str) -> Callable[[F], F]:
    """Mark a route handler that runs no gateway operation as needing ``permission``."""

    def mark(handler: F) -> F:
        handler.permission = permission  # type: ignore[attr-defined]
        return handler

    return mark


def public(handler: F) -> F:
    """Mark a route handler as open to every caller."""
    return requires(PUBLIC)(handler)


def declared(handler: Any) -> tuple[tuple[str, ...], str | None]:
    """What a handler declared: ``(operations, permission)``; both empty when nothing."""
    return tuple(getattr(handler, "operations", ())), getattr(handler, "permission", None)
