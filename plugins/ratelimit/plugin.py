"""The ``rate_limits`` hook plugin: token buckets per caller, in memory or in Redis.

It owns the top-level ``[rate_limits]`` section and contributes the gateway middleware
at order 300, so every protocol's calls are limited alike. The model, the headers and
what happens when Redis is down are in docs/security/rate-limits.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from dynaconf import Validator

from inferno.kernel import ConfigError, ConfigProblem, ConfigSpec, KernelHandle, hookimpl
from inferno.kernel.logs import get_logger

from .limits import KEYS, LimitPolicy, valid_limits_table
from .middleware import RateLimitMiddleware
from .stores import MemoryStore, StorageUnavailable, Store

SECTION = "rate_limits"
#: The service the middleware is offered as, to look inside a running server.
SERVICE = "rate_limits"

DEFAULTS: dict[str, Any] = {
    # Limit calls at all; false lets every call through unchecked.
    "enabled": True,
    # "memory": buckets in this process (one Inferno); "redis": shared by every process
    # that names the same redis_url and key_prefix; "auto": redis when redis_url is set.
    "storage": "auto",
    # The Redis server, e.g. "redis://127.0.0.1:6379/0"; may hold a password (never logged).
    "redis_url": "",
    # Prefix of every Redis key this plugin writes.
    "key_prefix": "inferno:rl:",
    # Seconds a Redis check may take before it counts as Redis being down.
    "storage_timeout": 0.5,
    # When Redis cannot be asked: "refuse" (503 with Retry-After) or "allow" (unlimited).
    "on_storage_error": "refuse",
    # Seconds a running call's slot lives in Redis without its process extending it: a
    # killed process's slots are free again within this time.
    "lease_seconds": 60,
    # Callers the memory store tracks; beyond, idle callers are forgotten, full first.
    "max_callers": 100_000,
    # Anonymous IPv6 callers are counted by network of this many bits (one host's /64).
    "ipv6_prefix": 64,
    # Limits of an authenticated caller whose roles have no table below; 0 is unlimited.
    "requests_per_minute": 0,
    "tokens_per_minute": 0,
    "concurrent": 0,
    # Limits of callers without a principal or with an anonymous one, per client address.
    "anonymous": {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrent": 0},
    # role → { requests_per_minute, tokens_per_minute, concurrent }; a key left out is the
    # default above. A caller with several roles gets the most generous value of each.
    "roles": {},
}

log = get_logger("rate_limits")


def _limit(name: str) -> Validator:
    return Validator(name, is_type_of=int, gte=0)


@hookimpl
def inferno_config_spec() -> ConfigSpec:
    return ConfigSpec(section=SECTION, defaults=DEFAULTS, secrets=frozenset({"redis_url"}),
                      validators=[
        Validator("enabled", is_type_of=bool),
        Validator("storage", is_in=["auto", "memory", "redis"]),
        Validator("redis_url", is_type_of=str,
                  condition=lambda url: not url or url.startswith(("redis://", "rediss://",
                                                                   "unix://")),
                  messages={"condition": "redis_url must start with redis://, rediss:// "
                                         "or unix://"}),
        Validator("key_prefix", is_type_of=str),
        Validator("storage_timeout", is_type_of=(int, float), gt=0),
        Validator("on_storage_error", is_in=["refuse", "allow"]),
        Validator("lease_seconds", is_type_of=(int, float), gte=1),
        Validator("max_callers", is_type_of=int, gte=100),
        Validator("ipv6_prefix", is_type_of=int, gte=0, lte=128),
        *(_limit(key) for key in KEYS),
        *(_limit(f"anonymous.{key}") for key in KEYS),
        Validator("roles", condition=_role_tables, messages={"condition": (
            "roles must map each role to a table of requests_per_minute, "
            "tokens_per_minute and concurrent, each a whole number (0: unlimited)")}),
    ])


@hookimpl
def inferno_configure(config: Mapping[str, Any]) -> None:
    if config["storage"] == "redis" and not config["redis_url"]:
        raise ConfigError([ConfigProblem(
            "rate_limits.redis_url", 'storage = "redis" needs the Redis server: set '
            "rate_limits.redis_url (INFERNO_RATE_LIMITS__REDIS_URL)")])


@hookimpl
def inferno_request_middleware(kernel: KernelHandle) -> RateLimitMiddleware | None:
    config = _own_section(kernel)
    return limiter(kernel, config) if config["enabled"] else None


@hookimpl
def inferno_lifespan(kernel: KernelHandle) -> AbstractAsyncContextManager[None]:
    return _serve(kernel)


@asynccontextmanager
async def _serve(kernel: KernelHandle) -> AsyncIterator[None]:
    config = _own_section(kernel)
    if not config["enabled"]:
        log.info("rate limits are off (rate_limits.enabled = false)")
        yield
        return
    middleware = limiter(kernel, config)
    store: Any = middleware.store
    ping = getattr(store, "ping", None)
    if ping is not None:
        try:
            await ping()
        except StorageUnavailable as exc:
            log.warning("rate limit storage unreachable at start", error=str(exc),
                        calls="let through" if middleware.fail_open else "refused")
    log.info("rate limits", storage=storage(config),
             where=getattr(store, "where", "this process"))
    try:
        yield
    finally:
        await middleware.store.close()


def limiter(kernel: KernelHandle, config: Mapping[str, Any]) -> RateLimitMiddleware:
    """The kernel's middleware, made on first use: the gateway asks for it and the
    lifespan closes its store, in whichever order the kernel runs them."""
    try:
        found: RateLimitMiddleware = kernel.service(SERVICE)
        return found
    except LookupError:
        pass
    middleware = RateLimitMiddleware(LimitPolicy(config), make_store(config),
                                     fail_open=config["on_storage_error"] == "allow")
    kernel.provide(SERVICE, middleware)
    return middleware


def storage(config: Mapping[str, Any]) -> str:
    """``memory`` or ``redis``: what ``storage`` names, ``auto`` resolved by ``redis_url``."""
    if config["storage"] == "auto":
        return "redis" if config["redis_url"] else "memory"
    return str(config["storage"])


def make_store(config: Mapping[str, Any]) -> Store:
    if storage(config) == "redis":
        from .redis_store import RedisStore

        return RedisStore(config["redis_url"], prefix=config["key_prefix"],
                          lease_seconds=float(config["lease_seconds"]),
                          timeout=float(config["storage_timeout"]))
    return MemoryStore(max_callers=int(config["max_callers"]))


def _own_section(kernel: KernelHandle) -> Mapping[str, Any]:
    """``[rate_limits]`` with ``redis_url`` as written (``kernel.config`` masks it)."""
    return kernel.plugin_config("rate_limits")


def _role_tables(roles: Any) -> bool:
    return isinstance(roles, Mapping) and all(
        isinstance(role, str) and valid_limits_table(table) for role, table in roles.items())
