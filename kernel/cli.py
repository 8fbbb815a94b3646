"""The ``inferno`` command line.

``--profile``, ``--config`` and ``--set`` are global options: given before the
subcommand or after it, every subcommand honours them. Plugins add subcommands
through the ``inferno_cli_commands`` hook.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click
import tomli_w

from .assembly import enabled_drivers
from .cli_state import CliState, global_options, protocol_option
from .config import load_settings, masked, read_toml, shipped_profiles
from .contracts import HOOK_PLUGIN_GROUP
from .errors import InfernoError
from .kernel import Kernel
from .loader import GROUPS, PluginEntry, call_for, discover, load, make_plugin_manager
from .logs import configure_logging


class InfernoGroup(click.Group):
    """Adds the subcommands that plugins contribute."""

    _following: Sequence[str] = ()

    def resolve_command(self, ctx: click.Context, args: list[str]
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        self._following = args[1:]  # global options may follow the command's name
        return super().resolve_command(ctx, args)

    def _plugin_commands(self, ctx: click.Context) -> tuple[dict[str, click.Command], str]:
        """The plugins' commands, or the reason they cannot be listed."""
        commands: dict[str, click.Command] = {}
        state = _with_following_options(ctx.ensure_object(CliState), self._following)
        try:
            results = state.kernel().hook.inferno_cli_commands()
        except InfernoError as exc:
            return commands, str(exc)  # the core commands still work
        for plugin_result in results:
            for command in plugin_result or ():
                if not isinstance(command, click.Command):
                    click.echo(f"warning: a plugin's inferno_cli_commands returned {command!r}, "
                               f"which is not a click command; ignored", err=True)
                    continue
                if command.name and command.name not in self.commands:
                    if not any(p.name == "profile" for p in command.params):
                        global_options(command)  # --profile etc. after the name, too
                    commands[command.name] = command
        return commands, ""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugin_commands(ctx)[0]})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        builtin = super().get_command(ctx, cmd_name)
        if builtin is not None:
            return builtin
        commands, problem = self._plugin_commands(ctx)
        if cmd_name not in commands and problem:
            _fail(f"no command {cmd_name!r} among the built-in ones, and the plugins' "
                  f"commands are unavailable because the {problem}")
        return commands.get(cmd_name)


def _with_following_options(state: CliState, args: Sequence[str]) -> CliState:
    """``state`` as it will be once the global options after the command are parsed, so that
    the plugins that provide the command are those of the profile the user named."""
    names = {"--profile": "profile", "-p": "profile", "--config": "config_file",
             "-c": "config_file", "--set": "sets", "-s": "sets"}
    found: dict[str, Any] = {"sets": list(state.sets)}
    words = iter(args)
    for word in words:
        option, equals, value = word.partition("=") if word.startswith("--") else (word, "", "")
        if option in names:
            value = value if equals else next(words, "")
            if names[option] == "sets":
                found["sets"].append(value)
            else:
                found[names[option]] = value
    if len(found) == 1 and found["sets"] == state.sets:
        return state
    return dataclasses.replace(state, **found)  # shares the cache of built kernels


@click.group(cls=InfernoGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@global_options
@protocol_option
@click.version_option(package_name="inferno", prog_name="inferno")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Inferno: serve local GGUF and ONNX models fast, safely and observably.

    With no command, starts the runtime with the chosen profile (like `serve`).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@cli.command()
@global_options
@protocol_option
@click.pass_obj
def serve(state: CliState) -> None:
    """Start the profile's plugins and serve until SIGINT or SIGTERM."""
    kernel = _configured(state)
    logging_cfg = kernel.config["logging"]
    configure_logging(logging_cfg["format"], logging_cfg["level"], logging_cfg["levels"])
    try:
        code = asyncio.run(kernel.serve())
    except InfernoError as exc:
        _fail(str(exc))
    sys.exit(code)


# --------------------------------------------------------------------------- plugins


@cli.group()
@global_options
def plugins() -> None:
    """List installed plugins and show what one provides."""


@plugins.command("list")
@global_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def plugins_list(state: CliState, as_json: bool) -> None:
    """Every installed plugin: name, kind, distribution, version, enabled in the profile."""
    catalog = discover()
    settings = _first_pass(state)
    enabled, _ = enabled_drivers(settings)
    table = settings.data.get("plugins", {})
    allow, block = list(table.get("allow", [])), list(table.get("block", []))
    rows = []
    claims = [*catalog.all(), *(c for group in catalog.conflicts.values() for c in group[1:])]
    for entry in sorted(claims, key=lambda e: (e.section, e.name, e.distribution)):
        if entry.group == HOOK_PLUGIN_GROUP:
            on = (not allow or entry.name in allow) and entry.name not in block
        else:
            on = entry.name in enabled.get(entry.section, []) and entry.name not in block
        conflict = (entry.group, entry.name) in catalog.conflicts
        rows.append({"name": entry.name, "kind": entry.section, "distribution": entry.distribution,
                     "version": entry.version, "enabled": on, "conflict": conflict})
    for (group, name), claims in catalog.conflicts.items():
        dists = " and ".join(c.distribution for c in claims)
        click.echo(f"warning: {group} plugin {name!r} is claimed by {dists}", err=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ["name", "kind", "distribution", "version", "enabled"]
    _table(rows, [*columns, "conflict"] if catalog.conflicts else columns)


@plugins.command("info")
@global_options
@click.argument("name")
@click.pass_obj
def plugins_info(state: CliState, name: str) -> None:
    """A plugin's entry point, the hooks it implements and its config keys with defaults.

    NAME is a plugin name, or KIND/NAME when two kinds share one.
    """
    kind, _, plain = name.rpartition("/")
    matches = [e for e in discover().all() if e.name == plain and (not kind or e.section == kind)]
    if not matches:
        _fail(f"no installed plugin named {name!r}; see `inferno plugins list`")
    if len(matches) > 1:
        choices = ", ".join(f"{e.section}/{e.name}" for e in matches)
        _fail(f"{name!r} is ambiguous; choose one of: {choices}")
    entry = matches[0]
    result = load(entry.group, [entry.name])
    if entry.name in result.failed:
        _fail(f"plugin {entry.name!r}: {result.failed[entry.name]}")
    obj = result.loaded[entry.name]
    manager = make_plugin_manager()
    manager.register(obj, entry.name)
    hooks = sorted(caller.name for caller in manager.get_hookcallers(obj) or [])
    spec = call_for(manager, entry.name, "inferno_config_spec")
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    click.echo(f"name:         {entry.name}")
    click.echo(f"kind:         {entry.section} ({entry.group})")
    click.echo(f"distribution: {entry.distribution} {entry.version}")
    click.echo(f"entry point:  {entry.value}")
    if doc:
        click.echo(f"about:        {doc[0]}")
    click.echo(f"hooks:        {', '.join(hooks) or 'none'}")
    click.echo(f"in profile:   {state.profile}: "
               f"{'enabled' if _enabled_in(state, entry) else 'not enabled'}")
    click.echo(f"config:       [{spec.section if spec and spec.section else entry.config_path}]")
    defaults = dict(spec.defaults) if spec else {}
    if not defaults:
        click.echo("  (no settings)")
    for key, value in masked(defaults, frozenset(spec.secrets) if spec else frozenset()).items():
        click.echo(f"  {key} = {json.dumps(value)}")


# --------------------------------------------------------------------------- profiles


@cli.group()
@global_options
def profile() -> None:
    """List, show and validate profiles."""


@profile.command("list")
@global_options
def profile_list() -> None:
    """The profiles shipped with Inferno."""
    rows = [{"name": name, "description": str(read_toml(path).get("description", ""))}
            for name, path in shipped_profiles().items()]
    _table(rows, ["name", "description"])


@profile.command("show")
@global_options
@click.argument("ref", required=False, metavar="[NAME|PATH]")
@click.option("--sources", is_flag=True, help="Show which file or variable set each key.")
@click.pass_obj
def profile_show(state: CliState, ref: str | None, sources: bool) -> None:
    """The merged configuration of a profile, secrets masked."""
    if ref:
        state.profile = ref
    kernel = _configured(state)
    if sources:
        settings = kernel.assembly.settings
        shown = masked(settings.data, kernel.assembly.secret_paths())
        for path in sorted(settings.sources):
            click.echo(f"{path} = {json.dumps(_at(shown, path))}  # {settings.sources[path]}")
        return
    files = ", ".join(str(path) for path in kernel.layers.files)
    click.echo(f"# profile {state.profile}, from: {files}")
    click.echo(tomli_w.dumps(kernel.masked_config()))


@profile.command("validate")
@global_options
@click.argument("ref", required=False, metavar="[NAME|PATH]")
@click.pass_obj
def profile_validate(state: CliState, ref: str | None) -> None:
    """Exit 0 when the profile is valid, or print every problem and exit 1."""
    if ref:
        state.profile = ref
    _configured(state)
    click.echo(f"profile {state.profile} is valid")


# --------------------------------------------------------------------------- helpers


def _configured(state: CliState) -> Kernel:
    try:
        return state.kernel()
    except InfernoError as exc:
        _fail(str(exc))


def _first_pass(state: CliState) -> Any:
    """The profile's layers merged without loading any plugin (cheap, for listings)."""
    try:
        return load_settings(state.layers(), defaults={})
    except InfernoError as exc:
        _fail(str(exc))


def _enabled_in(state: CliState, entry: PluginEntry) -> bool:
    settings = _first_pass(state)
    table = settings.data.get("plugins", {})
    if entry.name in table.get("block", []):
        return False
    if entry.group == HOOK_PLUGIN_GROUP:
        allow = table.get("allow", [])
        return not allow or entry.name in allow
    return entry.name in enabled_drivers(settings)[0].get(entry.section, [])


def _at(tree: Any, path: str) -> Any:
    for part in path.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[str(row[c]).lower() if isinstance(row[c], bool) else str(row[c]) for c in columns]
             for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    configure_logging(os.environ.get("INFERNO_LOGGING__FORMAT", "console").strip('"'),
                      level="warning")
    cli.main(args=list(argv) if argv is not None else None, prog_name="inferno")


__all__ = ["GROUPS", "CliState", "cli", "global_options", "main", "protocol_option"]
