"""The ``none`` auth provider: every caller is the same anonymous principal.

Meant for a laptop or a device where only the machine's own users reach Inferno: it
refuses to start while a protocol listens on an address other machines can reach,
unless the profile says ``allow_insecure = true``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from dynaconf import Validator

from inferno.kernel import AuthProvider, ConfigSpec, Credentials, InfernoError, Principal, hookimpl

DEFAULTS: dict[str, Any] = {
    # Roles every caller gets (see [security] roles).
    "roles": ["operator"],
    # Serve anonymous callers on addresses other machines can reach (not loopback).
    "allow_insecure": False,
}


class InsecureAddress(InfernoError):
    """Anonymous access on an address other machines can reach."""


class AnonymousAuth(AuthProvider):
    """Vouches for every caller as ``anonymous`` with the configured roles."""

    #: Asked after every other provider, wherever its table is: a key is checked if given.
    admits_everyone = True

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, validators=[
            Validator("roles", is_type_of=list,
                      condition=lambda roles: all(isinstance(r, str) and r for r in roles),
                      messages={"condition": "must be a list of role names"}),
            Validator("allow_insecure", is_type_of=bool),
        ])

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.principal = Principal("anonymous", frozenset(self.config["roles"]),
                                   {"provider": "none", "anonymous": True})

    async def start(self) -> None:
        if self.config["allow_insecure"]:
            return
        exposed = exposed_addresses(self.context.kernel.config.get("protocols", {}))
        if exposed:
            where = ", ".join(f"protocols.{name}.host = {host!r}" for name, host in exposed)
            raise InsecureAddress(
                f"auth provider 'none' lets every caller in, but {where} is reachable from "
                f"other machines: listen on 127.0.0.1, enable [auth.api_key] or [auth.jwt] "
                f"instead, or set auth.none.allow_insecure = true if a gateway in front "
                f"authenticates callers")

    async def authenticate(self, credentials: Credentials) -> Principal:
        return self.principal


def exposed_addresses(protocols: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The enabled protocols whose ``host`` is not a loopback address ("" listens on every
    interface)."""
    exposed = []
    for name, table in protocols.items():
        if not isinstance(table, Mapping) or table.get("enabled", True) is False:
            continue
        if name == "websocket" and shares_http(protocols):
            continue  # served on the http protocol's address, checked as http
        host = table.get("host")
        if isinstance(host, str) and not is_loopback(host):
            exposed.append((name, host))
    return exposed


def shares_http(protocols: Mapping[str, Any]) -> bool:
    """Whether the WebSocket endpoint is on the http protocol's server (an enabled one)."""
    http = protocols.get("http")
    own = protocols.get("websocket", {})
    return bool(own.get("share_http", True)) and isinstance(http, Mapping) \
        and http.get("enabled", True) is not False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
