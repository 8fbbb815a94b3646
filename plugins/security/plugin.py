"""The ``security`` hook plugin: puts the admission middleware (network policy,
authentication, permissions, model allowlists) in front of every gateway call.

Its settings are the top-level ``[security]`` section; the auth providers are drivers
of their own (``[auth.none]``, ``[auth.api_key]``, ``[auth.jwt]``), tried in profile order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import click
from dynaconf import Validator

from inferno.kernel import ConfigError, ConfigProblem, ConfigSpec, KernelHandle, hookimpl
from inferno.kernel.logs import get_logger

from .network import networks
from .roles import role_problems

log = get_logger("security")

DEFAULTS: dict[str, Any] = {
    # Roles beside (or replacing) the built-in viewer, user, operator and admin:
    # { auditor = ["audit:read", "metrics:read"] }.
    "roles": {},
    # Addresses or networks (CIDR) that may call; empty means every address.
    "allow": [],
    # Addresses or networks that may not call, whatever "allow" says.
    "deny": [],
    # Proxies whose X-Forwarded-For names the real client (addresses or networks).
    "trusted_proxies": [],
    # Record every successful authentication in the audit log, not only the failures.
    "audit_successes": True,
    # Whether protocols.http.cors_origins may contain "*" (any web page).
    "allow_wildcard_cors": True,
}


def _strings(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)


@hookimpl
def inferno_config_spec() -> ConfigSpec:
    return ConfigSpec(section="security", defaults=DEFAULTS, validators=[
        Validator("allow", "deny", "trusted_proxies", condition=_strings,
                  messages={"condition": "must be a list of addresses or CIDR networks"}),
        Validator("audit_successes", "allow_wildcard_cors", is_type_of=bool),
    ])


@hookimpl
def inferno_configure(config: Mapping[str, Any]) -> None:
    problems = [ConfigProblem("security.roles", problem)
                for problem in role_problems(config["roles"])]
    for key in ("allow", "deny", "trusted_proxies"):
        try:
            networks(config[key])
        except ValueError as exc:
            problems.append(ConfigProblem(f"security.{key}", str(exc)))
    if problems:
        raise ConfigError(problems)


@hookimpl
def inferno_cli_commands() -> Sequence[click.Command]:
    """``inferno keys``, whether or not the profile enables ``[auth.api_key]`` (without it
    the commands say which table to add)."""
    from inferno.plugins.auth.keys_cli import COMMANDS

    return COMMANDS


@hookimpl
def inferno_request_middleware(kernel: KernelHandle) -> Any:
    from .middleware import SecurityMiddleware

    config = kernel.config["security"]
    http = kernel.config.get("protocols", {}).get("http")
    if not config["allow_wildcard_cors"] and isinstance(http, Mapping) \
            and "*" in http.get("cors_origins", ()):
        raise ConfigError([ConfigProblem(
            "protocols.http.cors_origins", "must name origins one by one: this profile "
            "forbids '*' (security.allow_wildcard_cors = false)")])
    if isinstance(http, Mapping) and http.get("enabled", True) is not False \
            and not http.get("tls_cert") and not config["trusted_proxies"] \
            and str(http.get("host", "")) not in ("127.0.0.1", "::1", "localhost"):
        log.warning("HTTP on a network address without TLS: keys and tokens cross the "
                    "network in clear; set protocols.http.tls_cert and tls_key, or list the "
                    "proxy that terminates TLS in security.trusted_proxies",
                    host=http.get("host"))
    return SecurityMiddleware(kernel, config)
