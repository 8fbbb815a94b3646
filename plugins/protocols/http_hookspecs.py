"""The hook the ``http`` protocol offers (added with ``inferno_add_hookspecs``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from inferno.kernel import KernelHandle
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
