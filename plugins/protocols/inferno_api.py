"""(being written)"""

from __future__ import annotations

from aiohttp import web

from .web import Server


def routes(server: Server) -> list[web.RouteDef]:
    return []
