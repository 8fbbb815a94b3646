"""The ``api_key`` auth provider: ``inf_`` keys from the key store (``keystore.py``).

A key arrives as ``Authorization: Bearer inf_...`` or ``X-API-Key: inf_...``; other
credentials are left to the other providers (a JWT, for instance). The provider also
serves the key administration: the ``keys.*`` gateway operations and their HTTP routes
(``keys_api.py``) and the ``inferno keys`` commands (``keys_cli.py``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaconf import Validator

from inferno.kernel import (
    AuthError,
    AuthProvider,
    ConfigSpec,
    Credentials,
    KernelHandle,
    Principal,
    hookimpl,
)
from inferno.plugins.protocols.http_hookspecs import AddsHttpAndGatewayHooks

from .keystore import KeyRecord, KeyStore, KeyStoreError, Rejected, iso

if TYPE_CHECKING:
    import click
    from aiohttp import web

    from inferno.plugins.gateway.calls import Operation

DEFAULTS: dict[str, Any] = {
    # The key store, an SQLite file. "": keys.sqlite in this provider's data folder. Give
    # several Inferno processes one path to share their keys (and revocations).
    "store": "",
    # Seconds between writes of a key's last-used time, per key and process; 0 writes on
    # every request (slower).
    "last_used_interval": 60.0,
}
#: Seconds ``stop`` waits for last-used writes still running.
STOP_WAIT = 5.0


class ApiKeyAuth(AddsHttpAndGatewayHooks, AuthProvider):
    """API keys (``inf_...``) stored as hashes in SQLite, shared by several processes."""

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, validators=[
            Validator("store", is_type_of=str),
            Validator("last_used_interval", is_type_of=(int, float), gte=0),
        ])

    @staticmethod
    @hookimpl
    def inferno_gateway_operations(kernel: KernelHandle
                                   ) -> Mapping[str, tuple[Operation, str]]:
        from .keys_api import operations

        return operations(kernel)

    @staticmethod
    @hookimpl
    def inferno_http_routes(kernel: KernelHandle) -> list[web.RouteDef]:
        from .keys_api import routes

        return routes(kernel)

    @staticmethod
    @hookimpl
    def inferno_cli_commands() -> Sequence[click.Command]:
        from .keys_cli import COMMANDS

        return COMMANDS

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._store: KeyStore | None = None
        #: Last-used writes under way (waited for in ``stop``).
        self._touches: set[asyncio.Future[Any]] = set()

    @property
    def store(self) -> KeyStore:
        if self._store is None:
            raise KeyStoreError("the api_key provider is not started")
        return self._store

    async def start(self) -> None:
        path = store_path(self.config, self.context.data_dir, self.context.kernel.data_dir)
        self._store = await asyncio.to_thread(
            KeyStore, path, last_used_interval=float(self.config["last_used_interval"]))
        self.log.info("API keys", store=str(path))

    async def stop(self) -> None:
        if self._touches:
            await asyncio.wait(self._touches, timeout=STOP_WAIT)
        if self._store is not None:
            self._store.close()
            self._store = None

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        """The key's principal. The lookup is one indexed read of a local SQLite file on a
        connection kept open: about 15 µs at p50 (with 1,000 keys), less than a thread hop
        would cost, so it runs on the event loop. The last-used write, once a minute per
        key at most, runs in a thread and is not waited for."""
        key = presented(credentials.headers)
        if key is None:
            return None
        found = self.store.lookup(key)
        if isinstance(found, Rejected):
            raise AuthError(rejection_message(found))
        now = time.time()
        if self.store.due(found, now):
            self._touch_later(found, now)
        return principal(found)

    def _touch_later(self, record: KeyRecord, now: float) -> None:
        future = asyncio.get_running_loop().run_in_executor(None, self._touch, record, now)
        self._touches.add(future)
        future.add_done_callback(self._touches.discard)

    def _touch(self, record: KeyRecord, now: float) -> None:
        try:
            self.store.touch(record, now)
        except (KeyStoreError, sqlite3.Error, OSError) as exc:  # the next use tries again
            self.log.warning("could not record a key's last use", key_id=record.id,
                             error=f"{type(exc).__name__}: {exc}")


def presented(headers: Mapping[str, str]) -> str | None:
    """The ``inf_`` key the headers carry: ``Authorization: Bearer`` first, then
    ``X-API-Key``; ``None`` when neither carries one."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token.startswith("inf_"):
        return token
    given = headers.get("x-api-key", "").strip()
    return given if given.startswith("inf_") else None


def rejection_message(rejected: Rejected) -> str:
    """What the caller is told: never the key."""
    if rejected.reason == "expired" and rejected.record is not None:
        return f"API key expired at {iso(rejected.record.expires_at)}"
    return {"malformed": "malformed API key", "unknown": "unknown API key",
            "revoked": "API key revoked"}.get(rejected.reason, "API key expired")


def principal(record: KeyRecord) -> Principal:
    """The principal a key stands for. ``limits`` is what the rate limiter reads."""
    return Principal(id=f"key:{record.id}", roles=frozenset(record.roles), attributes={
        "provider": "api_key", "key_id": record.id, "name": record.name, "owner": record.owner,
        "models": list(record.models), "limits": dict(record.limits)})


def store_path(config: Mapping[str, Any], own_dir: Path, data_dir: Path) -> Path:
    """``store`` as a path: ``keys.sqlite`` in ``own_dir`` when empty; relative to the data
    directory when relative."""
    given = str(config.get("store", "")).strip()
    if not given:
        return own_dir / "keys.sqlite"
    path = Path(given).expanduser()
    return path if path.is_absolute() else data_dir / path
