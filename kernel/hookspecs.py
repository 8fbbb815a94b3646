"""The hooks Inferno's kernel calls. Every hook is synchronous and cheap.

Plugins implement them with ``@inferno.kernel.hookimpl``. Async work lives in
the objects a hook hands over (a driver, an async context manager), never in
the hook itself. ``docs/hooks.md`` documents each one; a test keeps the two in
step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from .config import ConfigSpec
    from .contracts import KernelHandle
    from .resources import EvictionRequest

PROJECT = "inferno"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration


@hookspec(historic=True)
def inferno_add_hookspecs(plugin_manager: pluggy.PluginManager) -> None:
    """Called for every plugin once all of them are registered, before configuration.

    A plugin that offers hooks of its own to other plugins adds their specs here
    with ``plugin_manager.add_hookspecs(module)``. Returns nothing.
    """


# --------------------------------------------------------------------------- configuration


@hookspec
def inferno_config_spec() -> ConfigSpec | None:
    """Called once per plugin while the configuration is merged.

    Return the plugin's defaults and validators for its own section
    (``[<kind>.<name>]`` for a driver, ``[plugins.<name>]`` for a hook module),
    with keys relative to that section, or ``None`` when it has no settings.
    The defaults are the lowest configuration layer.
    """


@hookspec
def inferno_configure(config: Mapping[str, Any]) -> None:
    """Called once per plugin after the whole configuration validated.

    ``config`` is the plugin's own validated section, read-only. Raise
    ``ConfigError`` for a problem the validators could not express.
    """


# --------------------------------------------------------------------------- lifecycle


@hookspec
def inferno_lifespan(kernel: KernelHandle) -> AbstractAsyncContextManager[None] | None:
    """Called while the kernel starts, after every driver but the protocols started.

    Return an async context manager: the kernel enters it now and exits it in
    reverse order at shutdown (only if entering succeeded). Use it for
    background tasks and bus subscriptions. Return ``None`` for nothing.
    """


@hookspec
def inferno_kernel_ready(kernel: KernelHandle) -> None:
    """Called once every plugin started and the protocols accept requests. Returns nothing;
    an exception here fails the start, which then stops everything that started."""


@hookspec
def inferno_kernel_stopping(kernel: KernelHandle, reason: str) -> None:
    """Called when shutdown begins, before draining. ``reason`` says why
    (``"signal SIGTERM"``, ``"start failed"``, ``"requested"``). Returns nothing; an
    exception here is logged and does not stop the shutdown."""


# --------------------------------------------------------------------------- resources


@hookspec
def inferno_evict(request: EvictionRequest) -> int:
    """Called when a reservation does not fit its budget.

    Release reservations you hold in ``request.resource`` (for example by
    unloading an idle model) and return the amount freed, or 0. Called until
    enough is free or every implementation returned 0.
    """
    return 0


# --------------------------------------------------------------------------- command line


@hookspec
def inferno_cli_commands() -> Sequence[click.Command]:
    """Called when the ``inferno`` command line is built.

    Return click commands or groups to add as subcommands. A command reaches the
    kernel through ``click.get_current_context().find_object(CliState)``.
    """
    return ()
