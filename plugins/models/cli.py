"""Commands: ``inferno models …``, ``run``, ``embed``, ``convert`` and ``bench``.

Each command that touches a model starts the profile's kernel in this process
without its protocols (a running server keeps its ports) and works through the
model manager, exactly as a request to the server would.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tomllib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import tomli_w

from inferno.kernel import GenerationRequest, InfernoError, Kernel
from inferno.kernel.cli import CliState, global_options
from inferno.kernel.logs import configure_logging

from .errors import ModelError
from .formats import describe
from .manager import ModelManager
from .registry import check_name

T = TypeVar("T")


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _kernel() -> Kernel:
    state = click.get_current_context().find_object(CliState)
    if state is None:
        state = CliState()
    try:
        return state.kernel()
    except InfernoError as exc:
        _fail(str(exc))


def with_models(work: Callable[[ModelManager], Awaitable[T]]) -> T:
    """Run ``work`` with the model manager of the profile's kernel, started without protocols."""
    kernel = _kernel()
    logging_cfg = kernel.config["logging"]
    if logging_cfg["level"] in ("info", "debug") and not logging_cfg["levels"]:
        # The command's output is the point; start-up lines only at the user's request.
        configure_logging(logging_cfg["format"], "warning" if logging_cfg["level"] == "info"
                          else "debug", logging_cfg["levels"])

    async def main() -> T:
        async with kernel.running(protocols=False):
            return await work(kernel.service("models"))

    try:
        return asyncio.run(main())
    except InfernoError as exc:
        _fail(str(exc))


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


# --------------------------------------------------------------------------- models


@click.group()
def models() -> None:
    """List, inspect, verify, add and remove registered models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@global_options
def list_models(as_json: bool) -> None:
    """Every registered model: name, format, size and where it came from."""

    async def work(manager: ModelManager) -> list[dict[str, Any]]:
        rows = manager.status()
        for row in rows:
            try:
                described = manager.describe(row["name"])
                row.update(format=described.format, size=described.size)
            except ModelError as exc:
                row.update(format=None, size=None, unavailable=row["unavailable"] or exc.reason)
        return rows

    rows = with_models(work)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no models registered (see `inferno models add --help`)")
        return
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        state = f"unavailable: {row['unavailable']}" if row["unavailable"] else (
            f"{row['format']:<11} {_human(row['size']):>10}  {row['source']}")
        if row.get("description"):
            state += f"  {row['description']}"
        click.echo(f"{row['name']:<{width}}  {state}")


@models.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
@global_options
def info(name: str, as_json: bool) -> None:
    """What a model is: its file, format and metadata, and how it is registered."""

    async def work(manager: ModelManager) -> dict[str, Any]:
        entry = manager.entry(name)
        described = manager.describe(name)
        return {"name": entry.name, "description": entry.description or None,
                "path": str(described.path), "format": described.format,
                "size": described.size, "source": entry.source, "aliases": list(entry.aliases),
                "backend": manager.backend_for(entry, described.format).name,
                "sha256": entry.sha256 or None, "metadata": dict(described.metadata)}

    result = with_models(work)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    for key, value in result.items():
        if key == "metadata":
            continue
        click.echo(f"{key:<12} {value}")
    for key, value in result["metadata"].items():
        shown = json.dumps(value) if isinstance(value, list | dict | str) else str(value)
        if len(shown) > 200:  # a chat template or a graph's inputs: --json has them whole
            shown = f"{shown[:197]}... ({len(shown)} characters; --json shows all)"
        click.echo(f"  {key:<20} {shown}")


@models.command("verify")
@click.argument("name", required=False)
@global_options
def verify(name: str | None) -> None:
    """Compute each model's sha256 (cached) and check it against its entry's checksum."""

    async def work(manager: ModelManager) -> int:
        names = [name] if name else sorted(manager.registry.entries)
        bad = 0
        for each in names:
            entry = manager.entry(each)
            try:
                path = entry.require_path()
                digest = await asyncio.to_thread(manager.checksums.sha256, path)
                if entry.sha256:
                    await asyncio.to_thread(manager.checksums.verify, path, entry.sha256)
                    click.echo(f"ok        {entry.name}  sha256:{digest}")
                else:
                    click.echo(f"unpinned  {entry.name}  sha256:{digest}")
            except ModelError as exc:
                bad += 1
                click.echo(f"FAILED    {entry.name}  {exc.reason}")
        return bad

    if with_models(work):
        sys.exit(1)


@models.command("add")
@click.argument("name")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--backend", default="", help="The backend to load it with (default: by format).")
@click.option("--alias", "aliases", multiple=True, help="Another name for it (repeatable).")
@click.option("--sha256", "checksum", default="", help="Refuse to load a file with another "
                                                        "checksum.")
@click.option("--pin", is_flag=True, help="Record the file's current sha256 as --sha256.")
@click.option("--chat-template", default="", help="A built-in template name or a Jinja "
                                                  "template.")
@click.option("--system-prompt", default="", help="The system message chats start with.")
@global_options
def add(name: str, path: Path, *, backend: str, aliases: tuple[str, ...], checksum: str,
        pin: bool, chat_template: str, system_prompt: str) -> None:
    """Register the model file PATH as NAME in the manifest (the file stays where it is)."""
    from .integrity import ChecksumCache
    from .plugin import manifest_path

    kernel = _kernel()
    try:
        check_name(name)
        for alias in aliases:
            check_name(alias, "alias")
        path = path.expanduser().resolve()
        described = describe(path)
        profile_entries = kernel.config["plugins"]["models"]["entries"]
        if name in profile_entries:
            raise ModelError(name, "is defined in the profile; change it there")
        if pin:
            cache = ChecksumCache(kernel.plugin_data_dir("plugins", "models") / "checksums.sqlite")
            checksum = cache.sha256(path)
    except InfernoError as exc:
        _fail(str(exc))
    manifest = manifest_path(kernel, kernel.config["plugins"]["models"])
    document = _read_manifest(manifest)
    table: dict[str, Any] = {"path": str(path)}
    extras = {"backend": backend, "sha256": checksum, "chat_template": chat_template,
              "system_prompt": system_prompt, "aliases": list(aliases)}
    table.update({k: v for k, v in extras.items() if v})
    replaced = name in document.setdefault("models", {})
    document["models"][name] = table
    _write_manifest(manifest, document)
    verb = "replaced" if replaced else "added"
    click.echo(f"{verb} {name}: {described.format}, {_human(described.size)} ({path})")


@models.command("remove")
@click.argument("name")
@global_options
def remove(name: str) -> None:
    """Remove NAME from the manifest (the file itself is not touched)."""
    from .plugin import manifest_path

    kernel = _kernel()
    manifest = manifest_path(kernel, kernel.config["plugins"]["models"])
    document = _read_manifest(manifest)
    if name not in document.get("models", {}):
        where = ("the profile" if name in kernel.config["plugins"]["models"]["entries"]
                 else "nowhere")
        _fail(f"{name}: not in the manifest {manifest} (it is registered in {where})")
    del document["models"][name]
    _write_manifest(manifest, document)
    click.echo(f"removed {name} from {manifest}")


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        _fail(f"{path}: cannot read the manifest: {exc}")


def _write_manifest(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".toml.partial")
    partial.write_text("# Models registered with `inferno models add`.\n"
                       + tomli_w.dumps(document))
    partial.replace(path)  # atomic: a crash never leaves half a manifest


# --------------------------------------------------------------------------- run, embed


def _sampling_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--temperature", type=float, help="0 is greedy and deterministic."),
        click.option("--top-p", type=float), click.option("--top-k", type=int),
        click.option("--min-p", type=float), click.option("--repeat-penalty", type=float),
        click.option("--presence-penalty", type=float),
        click.option("--frequency-penalty", type=float),
        click.option("--seed", type=int, help="Fixes the sampling for repeatable output."),
        click.option("--max-tokens", type=int, help="At most this many tokens (-1: as many as "
                                                    "the context allows)."),
        click.option("--stop", multiple=True, help="Stop before this text (repeatable)."),
        click.option("--json-mode", is_flag=True, help="Answer with one JSON object."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _params(values: Mapping[str, Any]) -> dict[str, Any]:
    names = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
             "frequency_penalty", "seed", "max_tokens")
    params = {n: values[n] for n in names if values.get(n) is not None}
    if values.get("stop"):
        params["stop"] = list(values["stop"])
    if values.get("json_mode"):
        params["response_format"] = "json"
    return params


@click.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user message through the model's "
                                           "chat template.")
@click.option("--system", default="", help="With --chat: a system message first.")
@click.option("--stats", is_flag=True, help="Print token counts and speed to stderr at the end.")
@_sampling_options
@global_options
def run(model: str, prompt: str, chat: bool, system: str, stats: bool, **values: Any) -> None:
    """Stream MODEL's continuation of PROMPT to the terminal ("-" reads PROMPT from stdin)."""
    text = sys.stdin.read() if prompt == "-" else prompt
    messages = None
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": text})
    request = GenerationRequest(request_id=uuid.uuid4().hex, prompt=None if chat else text,
                                messages=messages, params=_params(values))

    async def work(manager: ModelManager) -> Mapping[str, Any] | None:
        usage = None
        async with manager.use(model) as loaded:
            stream = loaded.generate(request)
            try:
                async for chunk in stream:
                    if chunk.text:
                        click.echo(chunk.text, nl=False)
                    if chunk.finish_reason:
                        usage = {"finish_reason": chunk.finish_reason, **(chunk.usage or {})}
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
        click.echo()
        return usage

    usage = with_models(work)
    if stats and usage:
        click.echo(json.dumps(usage), err=True)


@click.command()
@click.argument("model")
@click.argument("texts", nargs=-1, required=True)
@global_options
def embed(model: str, texts: tuple[str, ...]) -> None:
    """Print MODEL's embedding of each TEXT as a JSON array, one per line ("-" reads stdin)."""
    inputs = [sys.stdin.read() if text == "-" else text for text in texts]

    async def work(manager: ModelManager) -> list[list[float]]:
        async with manager.use(model) as loaded:
            return await loaded.embed(inputs)

    for vector in with_models(work):
        click.echo(json.dumps([round(x, 6) for x in vector]))


COMMANDS: list[click.Command] = [models, run, embed]
