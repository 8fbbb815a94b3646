"""The command line's state: the global options and the kernel they describe.

``--profile``, ``--config`` and ``--set`` are accepted on the ``inferno`` group
and on every subcommand (plugins' too); ``--protocol`` on the commands that serve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from .config import Layers, load_settings, profile_chain
from .errors import InfernoError
from .kernel import Kernel
from .logs import configure_logging

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class CliState:
    """The global options, and the kernel they describe (built on first use).

    A plugin's command reaches it with
    ``click.get_current_context().find_object(CliState)``; its tests can hand
    one a ready kernel with ``CliState.for_kernel(kernel)``.
    """

    profile: str = "edge"
    config_file: str | None = None
    sets: list[str] = field(default_factory=list)
    #: ``--protocol``: serve only these protocols, whatever the profile enables.
    protocols: list[str] = field(default_factory=list)
    preset: Kernel | None = None
    _built: dict[tuple[str, str | None, tuple[str, ...]], Kernel] = field(default_factory=dict)

    @classmethod
    def for_kernel(cls, kernel: Kernel) -> CliState:
        return cls(preset=kernel)

    def kernel(self) -> Kernel:
        """The configured kernel for the options as they stand now (raises ``ConfigError``)."""
        if self.preset is not None:
            return self.preset
        sets = [*self.sets, *self._protocol_sets()]
        key = (self.profile, self.config_file, tuple(sets))
        if key not in self._built:
            self.log_like_profile()
            self._built[key] = Kernel.from_profile(self.profile, config_file=self.config_file,
                                                   sets=sets).configure()
        return self._built[key]

    def layers(self) -> Layers:
        files = profile_chain(self.profile)
        if self.config_file:
            files.append(Path(self.config_file).expanduser().resolve())
        return Layers(files=files, sets=tuple(self.sets))

    def _protocol_sets(self) -> list[str]:
        """``--protocol`` as ``--set`` layers: the named protocols on, the profile's others off."""
        if not self.protocols:
            return []
        tables = load_settings(self.layers(), defaults={}).data.get("protocols", {})
        return [*(f"protocols.{name}.enabled=false" for name in tables
                  if name not in self.protocols),
                *(f"protocols.{name}.enabled=true" for name in self.protocols)]

    def log_like_profile(self) -> None:
        """Log as the profile says from the start, so that even what happens while it is
        loaded (warnings, traced hooks) comes out in its format and level."""
        try:
            section = load_settings(self.layers(), defaults={}).data.get("logging", {})
            configure_logging(section.get("format", "console"), section.get("level", "info"),
                              section.get("levels", {}))
        except (InfernoError, KeyError, TypeError, AttributeError):
            pass  # the configuration itself will report what is wrong


def _remember(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, _: click.Parameter, value: Any) -> Any:
        state = ctx.ensure_object(CliState)
        if name in ("sets", "protocols"):
            getattr(state, name).extend(value or ())
        elif value is not None:
            setattr(state, name, value)
        return value
    return callback


def protocol_option(command: F) -> F:
    """``--protocol NAME`` (repeatable) for the commands that serve."""
    return click.option(
        "--protocol", "protocols", metavar="NAME", multiple=True, expose_value=False,
        callback=_remember("protocols"),
        help="Serve only this protocol (http, websocket, stdin ...), whatever the profile "
             "enables; repeatable.")(command)


def global_options(command: F) -> F:
    """``--profile``, ``--config`` and ``--set``, accepted on the group and every subcommand.

    Works on a function or on an existing click command (plugins' commands get them
    this way), so that the options can follow the command's name.
    """
    options = [
        click.option("--profile", "-p", "profile", metavar="NAME|PATH", expose_value=False,
                     callback=_remember("profile"), envvar="INFERNO_PROFILE",
                     help="A shipped profile name or a profile file (default: edge)."),
        click.option("--config", "-c", metavar="FILE", expose_value=False,
                     callback=_remember("config_file"), envvar="INFERNO_CONFIG",
                     help="A user configuration file layered over the profile."),
        click.option("--set", "-s", "sets", metavar="SECTION.KEY=VALUE", multiple=True,
                     expose_value=False, callback=_remember("sets"),
                     help="Override one key; repeatable. The value is parsed as TOML."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
