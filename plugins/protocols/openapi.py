"""(being written)"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from .web import Server


def routes(server: Server, app_routes: Sequence[web.AbstractRouteDef]) -> list[web.RouteDef]:
    return []
