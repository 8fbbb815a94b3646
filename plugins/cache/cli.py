"""Commands: ``inferno cache stats | clear [--tier NAME] [--model NAME]``.

They read the profile's configuration and open its shared tiers (``disk``, ``redis``)
directly, without starting a kernel: no model is loaded, no port is opened, and they work
beside a running server, which shares those tiers (diskcache and Redis are made for
several processes). The ``memory`` tier lives inside the server process: its figures and
its clearing are for ``GET`` and ``DELETE /api/v1/cache``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

import click

from inferno.kernel import DriverContext, InfernoError, Kernel
from inferno.kernel.cli import CliState, global_options
from inferno.kernel.logs import get_logger

from .events import CacheCleared

#: Tiers whose entries live in the server's process, out of this command's reach.
IN_PROCESS = frozenset({"memory"})


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _kernel() -> Kernel:
    state = click.get_current_context().find_object(CliState) or CliState()
    try:
        return state.kernel()
    except InfernoError as exc:
        _fail(str(exc))


def _alias_of(kernel: Kernel, name: str) -> str:
    """The registered name ``name`` is an alias of in the profile's entries, else ``name``."""
    entries = kernel.config.get("plugins", {}).get("models", {}).get("entries", {})
    for canonical, table in entries.items():
        if isinstance(table, Mapping) and name in (table.get("aliases") or ()):
            return str(canonical)
    return name


async def _with_tiers(kernel: Kernel, tier: str | None, work: Any) -> dict[str, Any]:
    """Start the shared tiers the profile names (or only ``tier``), run ``work(name, tier)``
    on each, stop them; ``{name: result}``."""
    classes = kernel.assembly.drivers.get("cache", {})
    if tier is not None and tier not in classes:
        _fail(f"no cache tier named {tier!r} in this profile; its tiers are "
              f"{', '.join(classes) or 'none'}")
    results: dict[str, Any] = {}
    for name, cls in classes.items():
        if (tier is not None and name != tier) or name in IN_PROCESS:
            continue
        context = DriverContext(name=name, kind="cache", kernel=kernel, log=get_logger(name),
                                config=kernel.plugin_config(name))
        driver = cls(context)
        await driver.start()
        try:
            results[name] = await work(name, driver)
        finally:
            await driver.stop()
    return results


@click.group()
def cache() -> None:
    """Inspect and clear the response cache's shared tiers (disk, redis)."""


@cache.command("stats")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines.")
@global_options
def stats(as_json: bool) -> None:
    """Entries, bytes, hits, misses and evictions of each shared tier."""
    kernel = _kernel()

    async def read(name: str, tier: Any) -> dict[str, int]:
        refresh = getattr(tier, "refresh_stats", None)
        if refresh is not None:
            await refresh()
        return dict(tier.stats())

    figures = asyncio.run(_with_tiers(kernel, None, read))
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    if not figures:
        click.echo("no shared cache tier in this profile (the memory tier's figures are at "
                   "GET /api/v1/cache)")
    for name, row in figures.items():
        click.echo(f"{name:<8} entries={row['entries']} bytes={row['bytes']} "
                   f"hits={row['hits']} misses={row['misses']} evictions={row['evictions']}")


@cache.command("clear")
@click.option("--tier", metavar="NAME", help="Only this tier (default: every shared tier).")
@click.option("--model", metavar="NAME", help="Only this model's entries (name or alias).")
@global_options
def clear(tier: str | None, model: str | None) -> None:
    """Remove cached answers from the shared tiers."""
    kernel = _kernel()
    if tier in IN_PROCESS:
        _fail(f"the {tier} tier lives in the server's process: clear it with "
              f"DELETE /api/v1/cache?tier={tier}")
    named = _alias_of(kernel, model) if model else None

    async def remove(name: str, driver: Any) -> int:
        count = int(await driver.clear(model=named) if named else await driver.clear())
        kernel.bus.publish(CacheCleared(tier=name, model=named or "", entries=count))
        return count

    removed = asyncio.run(_with_tiers(kernel, tier, remove))
    for name, count in removed.items():
        what = f"entries of {named}" if named else "entries"
        click.echo(f"{name}: removed {count} {what}")
    if not removed:
        click.echo("no shared cache tier in this profile: nothing removed")
