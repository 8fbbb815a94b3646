"""The hook the ``http`` protocol offers (added with ``inferno_add_hookspecs``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from inferno.kernel import KernelHandle, hookimpl
from inferno.kernel.hookspecs import hookspec

if TYPE_CHECKING:
    from aiohttp import web


@hookspec
def inferno_http_routes(kernel: KernelHandle) -> Sequence[web.AbstractRouteDef] | None:
    """Called once when the HTTP server starts, before it listens.

    Return aiohttp route definitions (``web.get("/metrics", handler)``) to serve on
    Inferno's HTTP server beside its own routes: the WebSocket endpoint, metrics, a
    dashboard. They get the server's request ids, CORS, body limit and error envelope.
    A route that serves models should go through ``kernel.service("gateway")``.
    """


@hookspec
def inferno_http_middlewares(kernel: KernelHandle) -> Sequence[Any] | None:
    """Called once when the HTTP server starts, before it listens.

    Return aiohttp middlewares (``@web.middleware``) to run on every request, inside the
    server's request id and error envelope and before the permission guard: they see the
    matched route (``request.match_info.route``) and the final status, for metrics by route
    and traces. They must not answer requests themselves.
    """


def add_to(plugin_manager: pluggy.PluginManager) -> None:
    """Add the spec unless it is there: the ``http`` protocol adds it, and so does the
    ``websocket`` one, whose route hook needs it even when ``http`` is not enabled."""
    if not hasattr(plugin_manager.hook, "inferno_http_routes") or \
            plugin_manager.hook.inferno_http_routes.spec is None:
        plugin_manager.add_hookspecs(sys.modules[__name__])


def add_with_gateway(plugin_manager: pluggy.PluginManager) -> None:
    """Add these specs and the gateway's (middlewares, operations): for a plugin that offers
    routes as well as gateway hooks, which must be known hooks even in a profile without the
    ``http`` protocol or before the ``gateway`` plugin registers."""
    from inferno.plugins.gateway import hookspecs as gateway_hookspecs

    add_to(plugin_manager)
    gateway_hookspecs.add_to(plugin_manager)


class AddsHttpAndGatewayHooks:
    """Base of a driver class that offers routes and gateway hooks: registers their specs
    (``add_with_gateway``) as it is registered itself."""

    @staticmethod
    @hookimpl
    def inferno_add_hookspecs(plugin_manager: pluggy.PluginManager) -> None:
        add_with_gateway(plugin_manager)
