"""Roles, the permissions they grant, and the models a principal may use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from inferno.kernel import Principal
from inferno.plugins.gateway.permissions import AUTHENTICATED, PERMISSIONS

ADMIN = "admin"

#: The built-in roles; ``[security] roles`` adds roles or replaces these.
DEFAULT_ROLES: dict[str, tuple[str, ...]] = {
    "viewer": ("models:read", "metrics:read"),
    "user": ("models:read", "metrics:read", "infer", "embed", "batch:submit", "batch:read"),
    "operator": ("models:read", "metrics:read", "infer", "embed", "batch:submit", "batch:read",
                 "models:manage", "cache:manage", "events:read"),
    "admin": (ADMIN,),
}


def role_table(configured: Mapping[str, Sequence[str]]) -> dict[str, frozenset[str]]:
    """The built-in roles with the configured ones over them."""
    merged: dict[str, Iterable[str]] = {**DEFAULT_ROLES, **configured}
    return {role: frozenset(permissions) for role, permissions in merged.items()}


def role_problems(configured: Any) -> list[str]:
    """What is wrong with a ``[security] roles`` table, one sentence each."""
    if not isinstance(configured, Mapping):
        return ["must be a table of role = [permissions]"]
    problems = []
    for role, permissions in configured.items():
        if not isinstance(permissions, list | tuple) \
                or not all(isinstance(p, str) for p in permissions):
            problems.append(f"role {role!r} must be a list of permission names")
            continue
        unknown = sorted(set(permissions) - set(PERMISSIONS))
        if unknown:
            problems.append(f"role {role!r} grants unknown permissions {unknown}; known: "
                            f"{', '.join(PERMISSIONS)}")
    return problems


class Roles:
    """Answers whether a principal's roles grant a permission."""

    def __init__(self, configured: Mapping[str, Sequence[str]]) -> None:
        self.table = role_table(configured)

    def permissions(self, principal: Principal) -> frozenset[str]:
        granted: set[str] = set()
        for role in principal.roles:
            granted |= self.table.get(role, frozenset())
        return frozenset(granted)

    def grants(self, principal: Principal, permission: str | None) -> bool:
        """Whether ``principal`` may do what needs ``permission`` (``None``: any principal)."""
        if permission in (None, "", AUTHENTICATED):
            return True
        granted = self.permissions(principal)
        return ADMIN in granted or permission in granted


def allowed_models(principal: Principal) -> frozenset[str] | None:
    """The models ``principal`` may use, or ``None`` for every model."""
    models = principal.attributes.get("models")
    if not models:
        return None
    return frozenset(str(model) for model in models)
