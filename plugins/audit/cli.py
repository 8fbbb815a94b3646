"""Commands: ``inferno audit verify | query | export | keygen``.

They read the profile's configuration (``--profile``, ``--config``, ``--set``) for the
key and the log's folder, and read the files directly: no kernel is started, so they work
beside a running server, which may go on appending while they read.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from inferno.kernel import InfernoError
from inferno.kernel.cli import CliState, global_options

from .errors import AuditError
from .keys import AuditKey, Keyring, key_bytes, keyring_from, new_key
from .settings import AuditSettings, own_section
from .verify import read_records, verify

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _log() -> tuple[Path, Keyring]:
    """The log's folder and the keys the profile configures."""
    state = click.get_current_context().find_object(CliState) or CliState()
    try:
        kernel = state.kernel()
        section = own_section(kernel)
        settings = AuditSettings.from_section(section, kernel.data_dir)
        return settings.directory, keyring_from(section)
    except (InfernoError, ValueError) as exc:
        _fail(str(exc))


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An ISO date or time (UTC unless it says otherwise), or an age: ``90s``, ``15m``,
    ``1h``, ``7d``, ``2w``."""
    now = now or datetime.now(UTC)
    relative = _RELATIVE.match(text)
    if relative:
        return now - timedelta(**{_UNITS[relative.group(2)]: float(relative.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither an ISO date or time (2025-01-31, "
                                 f"2025-01-31T12:00:00Z) nor an age like 1h or 7d") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _time_of(record: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00"))


@click.group()
def audit() -> None:
    """Verify, search and export the audit log, and make keys for it."""


@audit.command("verify")
@global_options
def verify_command() -> None:
    """Check the whole log: exit 0 when intact, 1 naming the first broken record and why
    (modified, deleted, reordered, truncated, wrong key or corrupt)."""
    directory, keyring = _log()
    result = verify(directory, keyring)
    if result.problem is not None:
        click.echo(f"FAILED {result.problem}")
        click.echo(f"({result.records} records were intact before it, in {directory})",
                   err=True)
        sys.exit(1)
    if not result.files:
        result.notes.append(f"there are no audit log files in {directory}")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"OK {result.records} records, {result.checkpoints} checkpoints, "
               f"{result.files} files, last seq {result.last_seq} ({directory})")


def _records() -> Iterator[dict[str, Any]]:
    directory, keyring = _log()
    try:
        yield from read_records(directory, keyring)
    except (AuditError, OSError) as exc:
        _fail(str(exc))


@audit.command("query")
@click.option("--since", help="From this time: an ISO date or time, or an age like 1h or 7d.")
@click.option("--until", help="Up to this time (same forms as --since).")
@click.option("--principal", help="Only records of this principal (wildcards: * and ?).")
@click.option("--action", help="Only this action, for example keys.create or 'auth.*'.")
@click.option("--outcome", help="Only this outcome: ok, denied or failed.")
@global_options
def query(since: str | None, until: str | None, principal: str | None, action: str | None,
          outcome: str | None) -> None:
    """Print the matching records, decrypted, as JSON lines (oldest first)."""
    start = parse_when(since) if since else None
    end = parse_when(until) if until else None
    for record in _records():
        if start is not None and _time_of(record) < start:
            continue
        if end is not None and _time_of(record) > end:
            continue
        if principal is not None and not fnmatch.fnmatchcase(str(record["principal"]),
                                                             principal):
            continue
        if action is not None and not fnmatch.fnmatchcase(str(record["action"]), action):
            continue
        if outcome is not None and record["outcome"] != outcome:
            continue
        click.echo(json.dumps(record, ensure_ascii=False))


@audit.command("export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file (created readable by its owner only) instead of "
                   "standard output.")
@global_options
def export(output: Path | None) -> None:
    """Every record, decrypted, as JSON lines (oldest first)."""
    if output is None:
        for record in _records():
            click.echo(json.dumps(record, ensure_ascii=False))
        return
    count = 0
    descriptor = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        for record in _records():
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    click.echo(f"exported {count} records to {output}", err=True)


@audit.command("keygen")
def keygen() -> None:
    """Print a new random key (base64 of 32 bytes) for audit.key or audit.key_file."""
    key = new_key()
    click.echo(key)
    if sys.stderr.isatty():
        fingerprint = AuditKey.from_bytes(key_bytes(key)).fingerprint
        click.echo(f"key id {fingerprint} (unless audit.key_id names it); keep the key "
                   f"secret, and keep it as long as its records must stay readable", err=True)
