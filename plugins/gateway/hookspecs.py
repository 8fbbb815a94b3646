"""The hook the gateway offers to other plugins (added with ``inferno_add_hookspecs``)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pluggy

from inferno.kernel import KernelHandle
from inferno.kernel.hookspecs import hookspec

if TYPE_CHECKING:
    from .calls import Middleware, Operation


@hookspec
def inferno_request_middleware(kernel: KernelHandle) -> Middleware | Sequence[Middleware] | None:
    """Called once when the gateway starts, after every driver but the protocols started.

    Return a middleware (or several) that every call of every protocol passes
    through: ``async def __call__(call, handler)`` returns ``await handler(call)`` to go
    on, or raises ``ApiError`` to refuse. Its ``order`` attribute places it (lower runs
    first; 100 observability, 200 authentication, 300 rate limits, 400 the cache).
    """


@hookspec
def inferno_gateway_operations(kernel: KernelHandle
                               ) -> Mapping[str, tuple[Operation, str]] | None:
    """Called once when the gateway starts, after every driver but the protocols started.

    Return further operations, ``{name: (operation, permission)}``: ``async def
    operation(call) -> ValueReply | StreamReply`` runs behind the same middlewares as
    ``chat`` does, and only for principals whose roles grant ``permission`` (see
    ``inferno.plugins.gateway.permissions``). Protocols reach them by name
    (``Call("keys.list")``).
    """


def add_to(plugin_manager: pluggy.PluginManager) -> None:
    """Add these specs unless they are there: the ``gateway`` plugin adds them, and so does
    a driver offering operations (``api_key``), whichever registers first."""
    if not hasattr(plugin_manager.hook, "inferno_gateway_operations") or \
            plugin_manager.hook.inferno_gateway_operations.spec is None:
        plugin_manager.add_hookspecs(sys.modules[__name__])
