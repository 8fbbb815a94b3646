"""The ``[audit]`` section: defaults, validators, and the settings the log runs with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaconf import Validator

from inferno.kernel.resources import parse_amount

if TYPE_CHECKING:
    from inferno.kernel import Kernel, KernelHandle

SECTION = "audit"
FSYNC_POLICIES = ("always", "interval", "never")

DEFAULTS: dict[str, Any] = {
    # Write the audit log. The enterprise profile turns it on.
    "enabled": False,
    # The key, base64 of 32 random bytes (`inferno audit keygen`); INFERNO_AUDIT__KEY sets it.
    "key": "",
    # A file that holds the key instead (base64, one line).
    "key_file": "",
    # The name written in each record for the key; "" names it by its fingerprint.
    "key_id": "",
    # Keys that sealed older records, base64, for reading them after a key rotation.
    "previous_keys": [],
    # Where the log files live; "" is <data_dir>/audit, a relative path is inside <data_dir>.
    "directory": "",
    # A file this large (bytes or "64MiB") is closed and a new one started.
    "max_bytes": "64MiB",
    # Start a new file when the UTC date changes.
    "rotate_daily": True,
    # "always": every record is on disk before the action goes on; "interval": every
    # fsync_interval seconds; "never": when the operating system writes it.
    "fsync": "always",
    "fsync_interval": 1.0,
    # Records between signed checkpoint lines.
    "checkpoint_every": 1000,
    # Refuse requests (503) whose record cannot be written.
    "fail_closed": True,
}


def _amount(value: Any) -> bool:
    try:
        return parse_amount(value) >= 4096
    except (TypeError, ValueError):
        return False


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


VALIDATORS = [
    Validator("enabled", "rotate_daily", "fail_closed", is_type_of=bool),
    Validator("key", "key_file", "key_id", "directory", is_type_of=str),
    Validator("previous_keys", condition=_strings,
              messages={"condition": "must be a list of base64 keys"}),
    Validator("max_bytes", condition=_amount,
              messages={"condition": "must be an amount of at least 4096 bytes, like '64MiB'"}),
    Validator("fsync", is_in=FSYNC_POLICIES),
    Validator("fsync_interval", gt=0),
    Validator("checkpoint_every", gte=1, is_type_of=int),
]
SECRETS = frozenset({"key", "previous_keys"})


@dataclass(frozen=True)
class AuditSettings:
    """What the writer needs of ``[audit]``, with paths resolved."""

    directory: Path
    max_bytes: int
    rotate_daily: bool
    fsync: str
    fsync_interval: float
    checkpoint_every: int
    fail_closed: bool

    @classmethod
    def from_section(cls, section: Mapping[str, Any], data_dir: Path) -> AuditSettings:
        directory = str(section.get("directory") or "")
        return cls(directory=data_dir / Path(directory).expanduser() if directory
                   else data_dir / SECTION,
                   max_bytes=parse_amount(section.get("max_bytes", DEFAULTS["max_bytes"])),
                   rotate_daily=bool(section.get("rotate_daily", True)),
                   fsync=str(section.get("fsync", "always")),
                   fsync_interval=float(section.get("fsync_interval", 1.0)),
                   checkpoint_every=int(section.get("checkpoint_every", 1000)),
                   fail_closed=bool(section.get("fail_closed", True)))


def own_section(kernel: KernelHandle | Kernel) -> Mapping[str, Any]:
    """``[audit]`` with its secrets (``kernel.config`` masks the key)."""
    return kernel.plugin_config("audit")
