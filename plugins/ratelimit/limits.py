"""Who a call is charged to and how much that caller may use.

A caller is the principal an auth provider vouched for, or, for anonymous callers, the
client address (an IPv6 client by its ``/64``, the block one host usually holds). Its
limits come from, most specific first: the key's own ``limits`` attribute, the most
generous of its roles' tables in ``[rate_limits.roles]``, and the section's defaults.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inferno.kernel import Principal

#: The three limits, as ``[rate_limits]`` and a key's ``limits`` attribute name them.
KEYS = ("requests_per_minute", "tokens_per_minute", "concurrent")


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-minute request and token allowances and calls at once; ``0`` is unlimited."""

    requests: int = 0
    tokens: int = 0
    concurrent: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.requests or self.tokens or self.concurrent)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], fallback: Limits | None = None) -> Limits:
        """The limits a config table names; a key it leaves out is ``fallback``'s."""
        base = fallback or cls()
        return cls(requests=_count(table.get("requests_per_minute"), base.requests),
                   tokens=_count(table.get("tokens_per_minute"), base.tokens),
                   concurrent=_count(table.get("concurrent"), base.concurrent))


def most_generous(limits: list[Limits]) -> Limits:
    """Each limit at its most generous over ``limits`` (unlimited beats any number)."""
    def best(values: list[int]) -> int:
        return 0 if 0 in values else max(values)
    return Limits(requests=best([one.requests for one in limits]),
                  tokens=best([one.tokens for one in limits]),
                  concurrent=best([one.concurrent for one in limits]))


class LimitPolicy:
    """Turns a call's caller into the name of its buckets and its limits.

    Role results are remembered per set of roles (a handful in any deployment), so the
    common call costs one dictionary look-up here.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.default = Limits.from_table(config)
        self.anonymous = Limits.from_table(config["anonymous"])
        self.roles = {str(role): Limits.from_table(table, self.default)
                      for role, table in (config.get("roles") or {}).items()}
        self.ipv6_prefix = int(config.get("ipv6_prefix", 64))
        self._by_roles: dict[frozenset[str], Limits] = {}

    def caller(self, principal: Principal | None, address: str) -> tuple[str, Limits]:
        """``(owner, limits)``: ``owner`` names the caller's buckets in the store."""
        if principal is None or principal.attributes.get("anonymous"):
            return "ip:" + self.address_key(address), self.anonymous
        return "id:" + principal.id, self.for_principal(principal)

    def for_principal(self, principal: Principal) -> Limits:
        limits = self._by_roles.get(principal.roles)
        if limits is None:
            limits = self._for_roles(principal.roles)
        override = principal.attributes.get("limits")
        if isinstance(override, Mapping) and override:
            return Limits.from_table(override, limits)
        return limits

    def _for_roles(self, roles: frozenset[str]) -> Limits:
        tables = [self.roles[role] for role in sorted(roles) if role in self.roles]
        limits = most_generous(tables) if tables else self.default
        if len(self._by_roles) < 1024:  # role sets come from config and keys: few
            self._by_roles[roles] = limits
        return limits

    def address_key(self, address: str) -> str:
        """The address an anonymous caller is counted under: IPv4 as is, IPv6 by its
        network of ``ipv6_prefix`` bits; anything else (a unix socket) as given."""
        if ":" not in address:
            return address or "local"
        try:
            parsed = ipaddress.IPv6Address(address.split("%", 1)[0].strip("[]"))
        except ValueError:
            return address
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        network = ipaddress.IPv6Network((parsed, self.ipv6_prefix), strict=False)
        return str(network)


def _count(value: Any, fallback: int) -> int:
    """A limit from config or a key's attributes: a whole number of at least 0."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return fallback


def valid_limits_table(table: Any) -> bool:
    """Whether ``table`` is a table of the three limits (any of them), each at least 0."""
    return isinstance(table, Mapping) and all(
        key in KEYS and isinstance(value, int) and not isinstance(value, bool) and value >= 0
        for key, value in table.items())
