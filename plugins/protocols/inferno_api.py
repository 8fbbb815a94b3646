"""Inferno's own HTTP API under ``/api/v1`` (models and status) and the health checks.

Model and status routes go through the gateway like every model request, so the
middlewares other plugins contribute (authentication, audit, metrics) see them. The
health checks do not: a load balancer or an orchestrator probes them without
credentials, and they must answer even when the gateway refuses work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from inferno.plugins.gateway.bodies import parse_keep_alive, require_object
from inferno.plugins.gateway.errors import invalid
from inferno.plugins.gateway.permissions import public, runs

from .web import Server, json_response, read_json

#: Fields ``POST /api/v1/models/{name}/load`` accepts; anything else is a typo to report.
LOAD_FIELDS = frozenset({"keep_alive"})


def routes(server: Server) -> list[web.RouteDef]:
    api = InfernoApi(server)
    return [
        web.get("/api/v1/models", api.list_models),
        web.get("/api/v1/models/{name}", api.get_model),
        web.post("/api/v1/models/{name}/load", api.load_model),
        web.post("/api/v1/models/{name}/unload", api.unload_model),
        web.post("/api/v1/models/{name}/rollback", api.rollback_model),
        web.get("/api/v1/status", api.status),
        web.get("/health/live", live),
        web.get("/health/ready", api.ready),
    ]


class InfernoApi:
    """The ``/api/v1`` handlers and the readiness check."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def run(self, request: web.Request, operation: str, body: Mapping[str, Any]
                  ) -> Any:
        """One gateway operation: each route is an operation and a body."""
        reply = await self.server.gateway.run(self.server.call(request, operation, body))
        return reply.value

    @runs("models.list")
    async def list_models(self, request: web.Request) -> web.Response:
        """Every registered model: where it comes from, whether it is loaded, and why it is
        unavailable when it is."""
        return json_response({"models": await self.run(request, "models.list", {})})

    @runs("models.get")
    async def get_model(self, request: web.Request) -> web.Response:
        """One model's status (loaded, version, requests in flight) and its details: the
        loaded model's info, or the file's format and metadata when it is not loaded."""
        return json_response(await self.run(request, "models.get", _named(request)))

    @runs("models.load")
    async def load_model(self, request: web.Request) -> web.Response:
        """Load a model now rather than at its first request; ``keep_alive`` sets how long it
        stays loaded while idle."""
        body = _named(request)
        if request.body_exists:
            given = require_object(await read_json(request))
            unknown = sorted(set(given) - LOAD_FIELDS)
            if unknown:
                raise invalid(f"unknown field {unknown[0]!r}; accepted fields: keep_alive",
                              unknown[0], "unknown_field")
            if given.get("keep_alive") is not None:
                parse_keep_alive(given["keep_alive"])  # refused before anything loads
                body["keep_alive"] = given["keep_alive"]
        return json_response(await self.run(request, "models.load", body))

    @runs("models.unload")
    async def unload_model(self, request: web.Request) -> web.Response:
        """Unload a model; requests in flight finish first. ``unloaded`` is false when it
        was not loaded."""
        return json_response(await self.run(request, "models.unload", _named(request)))

    @runs("models.rollback")
    async def rollback_model(self, request: web.Request) -> web.Response:
        """Serve a hot-swapped model's previous version again, until its file changes once
        more."""
        return json_response(await self.run(request, "models.rollback", _named(request)))

    @runs("status")
    async def status(self, request: web.Request) -> web.Response:
        """Version, uptime, loaded models with the memory they hold, and queue depths."""
        return json_response(await self.run(request, "status", {}))

    @public
    async def ready(self, request: web.Request) -> web.Response:
        """200 while Inferno serves and every preloaded model loaded; otherwise 503 with
        the reasons, so an orchestrator holds traffic back and an operator sees why."""
        kernel = self.server.kernel
        reasons = []
        if kernel.state != "running":
            reasons.append(f"Inferno is {kernel.state}, not running")
        models = self._models()
        failures = dict(getattr(models, "preload_failures", None) or {})
        reasons += [f"model {name!r} failed to preload: {reason}"
                    for name, reason in sorted(failures.items())]
        value = {"status": "not_ready" if reasons else "ready", "state": kernel.state,
                 "reasons": reasons, "preload_failures": failures}
        response = json_response(value, status=503 if reasons else 200)
        if kernel.state == "starting":
            response.headers["Retry-After"] = "1"
        return response

    def _models(self) -> Any:
        try:
            return self.server.kernel.service("models")
        except LookupError:
            return None  # no model manager in this profile: nothing to report


@public
async def live(request: web.Request) -> web.Response:
    """200 for as long as the process answers HTTP at all."""
    return json_response({"status": "live"})


def _named(request: web.Request) -> dict[str, Any]:
    return {"model": request.match_info["name"]}
