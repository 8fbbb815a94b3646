"""The ``cache`` hook plugin: the response cache in front of the models.

The tiers are drivers of kind ``cache`` (``[cache.memory]``, ``[cache.disk]``,
``[cache.redis]``), asked in the order the profile names them. This plugin's own
settings are ``[plugins.cache]`` (``[cache]`` is the tiers' kind section). It contributes
the gateway middleware (order 400), offers ``kernel.service("cache")``, the
``cache.stats`` and ``cache.clear`` operations with their ``/api/v1/cache`` routes, the
``inferno cache`` commands, and runs the configured warm-up requests once the server is
ready. docs/cache.md has the whole picture.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import pluggy
from dynaconf import Validator

from inferno.kernel import ConfigError, ConfigProblem, ConfigSpec, KernelHandle, hookimpl
from inferno.kernel.logs import get_logger

from .service import ResponseCache

if TYPE_CHECKING:
    import click
    from aiohttp import web

    from inferno.plugins.gateway.calls import Operation

    from .middleware import CacheMiddleware

NAME = "cache"
DEFAULTS: dict[str, Any] = {
    # Answer calls from the cache tiers; false leaves every call to the models.
    "enabled": True,
    # Cache only answers that do not change: temperature 0 or a fixed seed (embeddings
    # always). False caches sampled answers too: the same question gets the same answer.
    "deterministic_only": True,
    # Larger answers (their stored form, in bytes) are not cached.
    "max_entry_bytes": 8 * 1024 * 1024,
    # Requests to run at start, per model: { model = ["a prompt", { input = "text" }] }.
    "warmup": {},
}

log = get_logger(NAME)


@hookimpl
def inferno_add_hookspecs(plugin_manager: pluggy.PluginManager) -> None:
    from inferno.plugins.protocols import http_hookspecs

    http_hookspecs.add_with_gateway(plugin_manager)
    from inferno.plugins.schedulers import hookspecs as scheduler_hookspecs

    scheduler_hookspecs.add_to(plugin_manager)


@hookimpl
def inferno_scheduler_actions(kernel: KernelHandle) -> Mapping[str, Any]:
    """``cache.warmup``: run the warm-up requests again, for a profile that schedules it
    (``[schedulers.apscheduler.jobs.warm] action = "cache.warmup"``), say after a model
    update or a clear."""

    async def warmup() -> None:
        await _warm_up(kernel, kernel.plugin_config(NAME)["warmup"])

    return {"cache.warmup": warmup}


@hookimpl
def inferno_config_spec() -> ConfigSpec:
    return ConfigSpec(defaults=DEFAULTS, validators=[
        Validator("enabled", is_type_of=bool),
        Validator("deterministic_only", is_type_of=bool),
        Validator("max_entry_bytes", is_type_of=int, gte=1),
    ])


@hookimpl
def inferno_configure(config: Mapping[str, Any]) -> None:
    from .warmup import problems

    found = problems(config["warmup"])
    if found:
        raise ConfigError([ConfigProblem(f"plugins.cache.warmup{'.' + key if key else ''}",
                                         problem) for key, problem in found])


@hookimpl
def inferno_request_middleware(kernel: KernelHandle) -> CacheMiddleware | None:
    from .middleware import CacheMiddleware

    config = kernel.plugin_config(NAME)
    if not config["enabled"] or not kernel.drivers("cache"):
        return None  # nothing to answer from: calls go straight to the models
    return CacheMiddleware(service(kernel), deterministic_only=bool(config["deterministic_only"]),
                           log=log)


@hookimpl
def inferno_gateway_operations(kernel: KernelHandle) -> Mapping[str, tuple[Operation, str]]:
    from .api import operations

    return operations(kernel)


@hookimpl
def inferno_http_routes(kernel: KernelHandle) -> list[web.RouteDef]:
    """``/api/v1/cache``, when the profile names a cache tier (else there is nothing to
    show or clear)."""
    from .api import routes

    return routes(kernel) if kernel.drivers("cache") else []


@hookimpl
def inferno_cli_commands() -> Sequence[click.Command]:
    from .cli import cache

    return [cache]


@hookimpl
def inferno_lifespan(kernel: KernelHandle) -> AbstractAsyncContextManager[None]:
    return _serve(kernel)


@hookimpl
def inferno_kernel_ready(kernel: KernelHandle) -> None:
    """Start the warm-up in the background: only in a server (its protocols run), not in a
    command that starts the kernel to run one model."""
    table = kernel.plugin_config(NAME)["warmup"]
    if not table or not kernel.drivers("protocols"):
        return
    cache = service(kernel)
    cache.warmup = asyncio.get_running_loop().create_task(_warm_up(kernel, table),
                                                          name="cache-warmup")


async def _warm_up(kernel: KernelHandle, table: Mapping[str, Any]) -> None:
    from .warmup import warm_up

    counts = await warm_up(kernel, table, log)
    log.info("warm-up done", **counts)


@asynccontextmanager
async def _serve(kernel: KernelHandle) -> AsyncIterator[None]:
    cache = service(kernel)
    if kernel.drivers("cache"):
        log.info("response cache", tiers=list(cache.tiers),
                 enabled=bool(kernel.plugin_config(NAME)["enabled"]))
    try:
        yield
    finally:
        if cache.warmup is not None and not cache.warmup.done():
            cache.warmup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cache.warmup
        await cache.close()


def service(kernel: KernelHandle) -> ResponseCache:
    """The kernel's cache, made on first use: the gateway asks for the middleware and the
    lifespan closes it, in whichever order the kernel runs them."""
    try:
        found: ResponseCache = kernel.service(NAME)
        return found
    except LookupError:
        pass
    cache = ResponseCache(kernel, kernel.plugin_config(NAME), log)
    kernel.provide(NAME, cache)
    return cache
