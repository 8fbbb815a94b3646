"""Audit keys: parsing, key ids, and the keys derived from each one.

One 32-byte audit key yields, through HKDF-SHA256 with a label per purpose, the AES-256-GCM
key that seals records, the HMAC key that signs checkpoints and the head file, and a short
fingerprint that names the key in each record when ``audit.key_id`` is empty. Deriving
instead of using the key directly keeps the three uses independent of each other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import AuditKeyError

KEY_BYTES = 32
KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
KEYGEN_HINT = "make one with `inferno audit keygen` (or `head -c 32 /dev/urandom | base64`)"


def _derive(key: bytes, purpose: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=f"inferno audit {purpose}".encode()).derive(key)


def new_key() -> str:
    """A fresh random key, base64 as ``audit.key`` takes it."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def key_bytes(text: Any) -> bytes:
    """The 32 key bytes of base64 ``text``; ``ValueError`` says what is wrong, never the value."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"is empty; {KEYGEN_HINT}")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"is not valid base64; {KEYGEN_HINT}") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"must be base64 of {KEY_BYTES} bytes, but it decodes to {len(raw)} "
                         f"bytes; {KEYGEN_HINT}")
    return raw


def decode_key(text: Any, where: str) -> bytes:
    """``key_bytes``, with errors that name ``where`` (a key path)."""
    try:
        return key_bytes(text)
    except ValueError as exc:
        raise AuditKeyError(f"{where} {exc}") from None


def read_key_file(path: str) -> bytes:
    """The key in ``path`` (base64, surrounding whitespace ignored)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not ASCII text"
        raise AuditKeyError(f"audit.key_file: cannot read {file}: {reason}") from None
    return decode_key(text, f"audit.key_file: the key in {file}")


@dataclass(frozen=True, repr=False)
class AuditKey:
    """One audit key and what is derived from it. Its repr names only the key id."""

    id: str
    sealer: AESGCM
    signer: bytes
    fingerprint: str

    @classmethod
    def from_bytes(cls, raw: bytes, key_id: str = "") -> AuditKey:
        fingerprint = "k" + _derive(raw, "key id", 6).hex()
        return cls(id=key_id or fingerprint, sealer=AESGCM(_derive(raw, "records")),
                   signer=_derive(raw, "checkpoints"), fingerprint=fingerprint)

    def sign(self, message: str) -> str:
        return hmac.new(self.signer, message.encode(), hashlib.sha256).hexdigest()

    def signed(self, message: str, mac: str) -> bool:
        return hmac.compare_digest(self.sign(message), mac)

    def __repr__(self) -> str:
        return f"AuditKey(id={self.id!r})"


@dataclass(repr=False)
class Keyring:
    """The key that writes (``current``) and the keys that only read older records.

    A record names its key by id. The current key answers to its configured id; a previous
    key answers to its fingerprint, or to any other id once it opened a record of that id
    (``bind``), so previous keys need no ids in the configuration.
    """

    current: AuditKey
    previous: list[AuditKey] = field(default_factory=list)
    _bound: dict[str, AuditKey] = field(default_factory=dict)

    def get(self, key_id: str) -> AuditKey | None:
        """The key known to answer to ``key_id``, if any."""
        if key_id in self._bound:
            return self._bound[key_id]
        for key in (self.current, *self.previous):
            if key_id in (key.id, key.fingerprint):
                return key
        return None

    def candidates(self, key_id: str) -> list[AuditKey]:
        """The keys that may answer to ``key_id``: the known one, else every unbound key."""
        known = self.get(key_id)
        if known is not None:
            return [known]
        bound = {id(k) for k in self._bound.values()}
        return [k for k in (self.current, *self.previous) if id(k) not in bound]

    def bind(self, key_id: str, key: AuditKey) -> None:
        self._bound[key_id] = key

    def __repr__(self) -> str:
        return f"Keyring(current={self.current.id!r}, previous={len(self.previous)})"


def key_problems(section: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every problem with the key settings of ``[audit]``, as (key path, message)."""
    problems: list[tuple[str, str]] = []
    if section.get("key"):
        try:
            key_bytes(section["key"])
        except ValueError as exc:
            problems.append(("audit.key", str(exc)))
    if section.get("key_file"):
        try:
            read_key_file(str(section["key_file"]))
        except AuditKeyError as exc:
            problems.append(("audit.key_file", str(exc).removeprefix("audit.key_file: ")))
    previous = section.get("previous_keys") or ()
    for index, text in enumerate(previous if isinstance(previous, list | tuple) else ()):
        try:
            key_bytes(text)
        except ValueError as exc:
            problems.append(("audit.previous_keys", f"entry {index + 1} {exc}"))
    key_id = section.get("key_id", "")
    if key_id and not KEY_ID.match(str(key_id)):
        problems.append(("audit.key_id", f"{key_id!r} is not a key id: use 1 to 64 letters, "
                                         f"digits, '.', '_' or '-'"))
    return problems


def keyring_from(section: Mapping[str, Any]) -> Keyring:
    """The keyring ``[audit]`` describes; ``AuditKeyError`` when it has no usable key."""
    if section.get("key"):
        raw = decode_key(section["key"], "audit.key")
    elif section.get("key_file"):
        raw = read_key_file(str(section["key_file"]))
    else:
        raise AuditKeyError(missing_key_message())
    previous = [AuditKey.from_bytes(decode_key(text, f"audit.previous_keys entry {i + 1}"))
                for i, text in enumerate(_strings(section.get("previous_keys")))]
    return Keyring(AuditKey.from_bytes(raw, str(section.get("key_id") or "")), previous)


def key_instructions() -> str:
    return ("set audit.key (or the environment variable INFERNO_AUDIT__KEY) to base64 of 32 "
            f"random bytes, or audit.key_file to a file that holds one; {KEYGEN_HINT}")


def missing_key_message() -> str:
    return f"the audit log has no key: {key_instructions()}"


def _strings(value: Any) -> Iterable[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else []
