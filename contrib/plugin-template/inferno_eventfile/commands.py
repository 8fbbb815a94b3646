"""Adds `inferno events`, which prints the newest lines of the event file.

This is the ``eventfile-cli`` hook module. It is not part of the driver because
hook modules are loaded whenever they are installed, while a driver is loaded
only when the profile enables it: so the command exists in every profile and
can explain what is missing when the profile does not enable the exporter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
from inferno.kernel import InfernoError, Kernel, hookimpl
from inferno.kernel.cli import CliState

from .exporter import NAME, EventFileExporter, events_file
from .records import last_lines


@hookimpl
def inferno_cli_commands() -> Sequence[click.Command]:
    return [events]


@click.command()
@click.option("--lines", "-n", "count", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many of the most recent events to print.")
def events(count: int) -> None:
    """Print the last events the eventfile exporter wrote for this profile."""
    kernel = _kernel()
    path = _events_path(kernel)
    if not path.is_file():
        _fail(f"no event file yet at {path}; start Inferno with this profile first")
    for line in last_lines(path, count):
        click.echo(line)


def _kernel() -> Kernel:
    """The configured kernel of the profile chosen with ``--profile``/``--config``/``--set``."""
    state = click.get_current_context().find_object(CliState)
    if state is None:
        _fail("`events` runs as a subcommand of `inferno`")
    try:
        return state.kernel()
    except InfernoError as exc:
        _fail(str(exc))


def _events_path(kernel: Kernel) -> Path:
    section = _enabled_section(kernel)
    if section is None:
        _fail(f"the {NAME} exporter is not enabled in this profile; add an "
              f"[exporters.{NAME}] table to it (see `inferno plugins info {NAME}`)")
    # The driver's data folder, by the kernel's own rule rather than a copy of it.
    return events_file(section, kernel.plugin_data_dir(EventFileExporter.kind, NAME))


def _enabled_section(kernel: Kernel) -> Mapping[str, Any] | None:
    section = kernel.config.get(EventFileExporter.kind, {}).get(NAME)
    if not isinstance(section, Mapping) or section.get("enabled", True) is False:
        return None
    return section


def _fail(message: str) -> NoReturn:
    """Report like Inferno's own commands do: ``error: ...`` on stderr, exit status 1."""
    click.echo(f"error: {message}", err=True)
    raise SystemExit(1)
