"""``inferno keys create | list | revoke | rotate``: API keys in the profile's key store.

Each command starts the profile's kernel in this process without its protocols (a
running server keeps its ports), so the ``api_key`` provider opens the same store the
server uses and the audit plugin, when the profile has one, records every change. A new
key is printed once, alone on its line on stdout (``KEY=$(inferno keys create ...)``).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import click

from inferno.kernel import InfernoError, Kernel
from inferno.kernel.cli import CliState, global_options
from inferno.kernel.logs import configure_logging

from .keys_api import Actor, KeyAdmin

T = TypeVar("T")
ONCE = ("warning: this is the only time the key is shown; store it now (Inferno keeps only "
        "its hash)")


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def with_admin(work: Callable[[KeyAdmin, Actor], Awaitable[T]]) -> T:
    """Run ``work`` with the key administration of the profile's kernel, started without
    protocols; the audit log names the operating-system user as the actor."""
    state = click.get_current_context().find_object(CliState) or CliState()
    try:
        kernel: Kernel = state.kernel()
    except InfernoError as exc:
        _fail(str(exc))
    if "api_key" not in kernel.assembly.drivers.get("auth", {}):
        _fail(f"API keys are not enabled in profile {state.profile!r}: add the table "
              f"[auth.api_key] to the profile or to a --config file, or pass "
              f"--set auth.api_key.enabled=true")
    logging_cfg = kernel.config["logging"]
    if logging_cfg["level"] in ("info", "debug") and not logging_cfg["levels"]:
        configure_logging(logging_cfg["format"], "warning" if logging_cfg["level"] == "info"
                          else "debug", logging_cfg["levels"])
    actor = Actor(principal=f"cli:{getpass.getuser()}", source="cli")

    async def main() -> T:
        async with kernel.running(protocols=False):
            return await work(KeyAdmin(kernel), actor)

    try:
        return asyncio.run(main())
    except InfernoError as exc:
        _fail(str(exc))


def _show_key(created: Mapping[str, Any], as_json: bool, summary: str) -> None:
    """The one display of a new key: stdout has it alone (or the JSON with it)."""
    click.echo(summary, err=True)
    click.echo(json.dumps(created, indent=2) if as_json else created["key"])
    click.echo(ONCE, err=True)


def _describe(record: Mapping[str, Any]) -> str:
    expires = f"expires {record['expires_at']}" if record["expires_at"] else "no expiry"
    models = ", ".join(record["models"]) or "all models"
    return f"{record['name']}; roles {', '.join(record['roles'])}; {models}; {expires}"


@click.group()
def keys() -> None:
    """Create, list, revoke and rotate API keys ([auth.api_key])."""


@keys.command("create")
@click.option("--name", required=True, help="A name for the key, unique among unrevoked keys.")
@click.option("--role", "roles", multiple=True, required=True,
              help="A role the key grants (repeatable): viewer, user, operator, admin or one "
                   "[security] roles defines.")
@click.option("--owner", default=None, help="Who the key is for (default: your user name).")
@click.option("--models", default="", metavar="A,B",
              help="Models the key may use, comma-separated (default: every model).")
@click.option("--expires", default=None, metavar="30d|2027-01-01",
              help="When the key stops working: a duration (h, d, w) or an ISO date or time.")
@click.option("--requests-per-minute", type=click.IntRange(min=1), default=None)
@click.option("--tokens-per-minute", type=click.IntRange(min=1), default=None)
@click.option("--concurrent", type=click.IntRange(min=1), default=None,
              help="Requests the key may have in flight at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the record and key as JSON.")
@global_options
def create(name: str, roles: Sequence[str], *, owner: str | None, models: str,
           expires: str | None, requests_per_minute: int | None,
           tokens_per_minute: int | None, concurrent: int | None, as_json: bool) -> None:
    """Create a key and print it, this once: only its hash is kept."""
    limits = {key: value for key, value in (("requests_per_minute", requests_per_minute),
                                            ("tokens_per_minute", tokens_per_minute),
                                            ("concurrent", concurrent)) if value is not None}
    body: dict[str, Any] = {
        "name": name, "roles": list(roles), "owner": getpass.getuser() if owner is None
        else owner, "models": [m.strip() for m in models.split(",") if m.strip()],
        "limits": limits, "expires": expires}

    async def work(admin: KeyAdmin, actor: Actor) -> dict[str, Any]:
        return await admin.create(body, actor)

    created = with_admin(work)
    _show_key(created, as_json, f"created API key {created['id']} ({_describe(created)})")


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Revoked keys too.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@global_options
def list_keys(include_revoked: bool, as_json: bool) -> None:
    """Every key's id, name, owner, roles, models, expiry, last use and status (never the
    key: it is not stored)."""

    async def work(admin: KeyAdmin, actor: Actor) -> list[dict[str, Any]]:
        return await admin.list_keys({"include_revoked": include_revoked})

    rows = with_admin(work)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no API keys (see `inferno keys create --help`)")
        return
    _table([{"id": r["id"], "name": r["name"], "owner": r["owner"],
             "roles": ",".join(r["roles"]), "models": ",".join(r["models"]) or "*",
             "expires": r["expires_at"] or "never", "last used": r["last_used_at"] or "never",
             "status": r["status"]} for r in rows])


@keys.command("revoke")
@click.argument("ref", metavar="ID|NAME")
@global_options
def revoke(ref: str) -> None:
    """Revoke a key; every Inferno process sharing the store refuses it at once."""

    async def work(admin: KeyAdmin, actor: Actor) -> dict[str, Any]:
        return await admin.revoke({"id": ref}, actor)

    record = with_admin(work)
    click.echo(f"revoked API key {record['id']} ({record['name']})")


@keys.command("rotate")
@click.argument("ref", metavar="ID|NAME")
@click.option("--expires", default=None, metavar="30d|2027-01-01",
              help="Another expiry for the new key (default: the old key's).")
@click.option("--json", "as_json", is_flag=True, help="Print the new record and key as JSON.")
@global_options
def rotate(ref: str, expires: str | None, as_json: bool) -> None:
    """Replace a key with a new one of the same name, roles, models and limits; the old
    key stops working at once. Prints the new key, this once."""
    body = {"id": ref} if expires is None else {"id": ref, "expires": expires}

    async def work(admin: KeyAdmin, actor: Actor) -> dict[str, Any]:
        return await admin.rotate(body, actor)

    created = with_admin(work)
    _show_key(created, as_json, f"rotated API key {created['replaces']} (now revoked) into "
                                f"{created['id']} ({_describe(created)})")


def _table(rows: Sequence[Mapping[str, str]]) -> None:
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
               .rstrip())
    for row in rows:
        click.echo("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True))
                   .rstrip())


COMMANDS: list[click.Command] = [keys]
