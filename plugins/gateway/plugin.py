"""The ``gateway`` hook plugin: builds the request pipeline and offers it as ``gateway``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pluggy
from dynaconf import Validator

from inferno.kernel import ConfigSpec, KernelHandle, hookimpl
from inferno.kernel.logs import get_logger

from . import hookspecs

DEFAULTS: dict[str, Any] = {
    # Requests one model runs at once; the rest wait in its queue.
    "concurrency": 1,
    # Requests that may wait for each model; one more is refused at once (503, Retry-After).
    "queue_limit": 16,
    # Seconds a request may wait for its turn before it is refused (503, Retry-After).
    "queue_timeout": 120.0,
    # Seconds a refused client is told to wait (the Retry-After header).
    "retry_after": 2,
    # Priority of a caller's requests by role, e.g. {admin = 10, batch = -5}: when a model's
    # turn frees, the waiting request of the highest priority takes it (the earliest of equal
    # ones). A caller takes its roles' highest; callers with none of these roles have 0.
    "priorities": {},
    # Most inputs of embedding requests gathered into one backend call while a model is busy.
    "embedding_batch": 32,
    # Seconds a new embedding batch waits for companions before it runs (0: no wait); it
    # runs sooner once it holds embedding_batch inputs, and at once for a lone client.
    "embedding_batch_window": 0.002,
}


@hookimpl
def inferno_add_hookspecs(plugin_manager: pluggy.PluginManager) -> None:
    hookspecs.add_to(plugin_manager)


def _priorities(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in value.values())


@hookimpl
def inferno_config_spec() -> ConfigSpec:
    return ConfigSpec(defaults=DEFAULTS, validators=[
        Validator("concurrency", gte=1, is_type_of=int),
        Validator("queue_limit", gte=0, is_type_of=int),
        Validator("queue_timeout", gt=0),
        Validator("retry_after", gte=0),
        Validator("embedding_batch", gte=1, is_type_of=int),
        Validator("priorities", is_type_of=dict, condition=_priorities,
                  messages={"condition": "priorities maps role names to integers, got "
                                         "{value!r}"}),
        Validator("embedding_batch_window", gte=0, lte=1, is_type_of=(int, float)),
    ])


@hookimpl
def inferno_lifespan(kernel: KernelHandle) -> AbstractAsyncContextManager[None]:
    return _serve(kernel)


@asynccontextmanager
async def _serve(kernel: KernelHandle) -> AsyncIterator[None]:
    from .gateway import Gateway

    config: Mapping[str, Any] = kernel.config["plugins"]["gateway"]
    middlewares = []
    for result in kernel.hook.inferno_request_middleware(kernel=kernel):
        if result is None:
            continue
        middlewares.extend(result if isinstance(result, list | tuple) else [result])
    gateway = Gateway(kernel, config, middlewares, get_logger("gateway"))
    for offered in kernel.hook.inferno_gateway_operations(kernel=kernel):
        for name, (operation, permission) in (offered or {}).items():
            gateway.add_operation(name, operation, permission=permission)
    kernel.provide("gateway", gateway)
    try:
        yield
    finally:
        await gateway.close()
