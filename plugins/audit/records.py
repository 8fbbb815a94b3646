"""The line format: sealed records, signed checkpoints and the signed head.

A record line is JSON: ``{"v", "seq", "kid", "nonce", "ct", "prev", "hash"}``. ``ct`` is the
event (JSON) sealed with AES-256-GCM under the key ``kid`` names, with ``v``, ``seq``,
``kid`` and ``prev`` as associated data, so a record cannot be renumbered or moved to
another place in the chain without the key. ``hash`` is SHA-256 over ``prev`` and the
stored fields: the chain. A checkpoint line ``{"v", "type": "checkpoint", "seq", "hash",
"kid", "time", "mac"}`` signs (HMAC-SHA256) the chain's state after record ``seq``; the head
file holds the same for the newest record, and the file it is in, rewritten in place.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .keys import AuditKey

VERSION = 1
GENESIS = "0" * 64
#: The head file is rewritten in place with one write of exactly this many bytes.
HEAD_SIZE = 512
NONCE_BYTES = 12
RECORD_FIELDS: Mapping[str, type] = {"v": int, "seq": int, "kid": str, "nonce": str, "ct": str,
                                     "prev": str, "hash": str}
CHECKPOINT_FIELDS: Mapping[str, type] = {"v": int, "type": str, "seq": int, "hash": str,
                                         "kid": str, "time": str, "mac": str}
HEAD_FIELDS: Mapping[str, type] = {"v": int, "seq": int, "hash": str, "file": str, "kid": str,
                                   "mac": str}


def chain_hash(prev: str, *, version: int, seq: int, kid: str, nonce: str, ct: str) -> str:
    return hashlib.sha256(f"{prev}|{version}|{seq}|{kid}|{nonce}|{ct}".encode()).hexdigest()


def associated_data(version: int, seq: int, kid: str, prev: str) -> bytes:
    return f"inferno-audit|{version}|{seq}|{kid}|{prev}".encode()


def seal(key: AuditKey, seq: int, prev: str, plaintext: bytes) -> tuple[bytes, str]:
    """The line for record ``seq`` after the record whose hash is ``prev``, and its hash."""
    nonce_raw = os.urandom(NONCE_BYTES)
    sealed = key.sealer.encrypt(nonce_raw, plaintext, associated_data(VERSION, seq, key.id, prev))
    nonce = base64.b64encode(nonce_raw).decode()
    ct = base64.b64encode(sealed).decode()
    digest = chain_hash(prev, version=VERSION, seq=seq, kid=key.id, nonce=nonce, ct=ct)
    line = (f'{{"v":{VERSION},"seq":{seq},"kid":"{key.id}","nonce":"{nonce}","ct":"{ct}",'
            f'"prev":"{prev}","hash":"{digest}"}}\n')
    return line.encode(), digest


def unseal(key: AuditKey, record: Mapping[str, Any]) -> bytes:
    """The event JSON of a parsed record line; ``cryptography``'s ``InvalidTag`` (or
    ``ValueError`` for bad base64) when ``key`` did not seal it or it was changed."""
    nonce = base64.b64decode(record["nonce"], validate=True)
    ct = base64.b64decode(record["ct"], validate=True)
    return key.sealer.decrypt(nonce, ct, associated_data(record["v"], record["seq"],
                                                         record["kid"], record["prev"]))


def hash_matches(record: Mapping[str, Any]) -> bool:
    """Whether a record's stored hash is the hash of its own fields."""
    return bool(record["hash"] == chain_hash(record["prev"], version=record["v"], seq=record["seq"],
                                        kid=record["kid"], nonce=record["nonce"],
                                        ct=record["ct"]))


def _checkpoint_message(seq: int, digest: str, kid: str, time: str) -> str:
    return f"checkpoint|{VERSION}|{seq}|{digest}|{kid}|{time}"


def _head_message(seq: int, digest: str, file: str, kid: str) -> str:
    return f"head|{VERSION}|{seq}|{digest}|{file}|{kid}"


def checkpoint_line(key: AuditKey, seq: int, digest: str, time: str) -> bytes:
    mac = key.sign(_checkpoint_message(seq, digest, key.id, time))
    return (f'{{"v":{VERSION},"type":"checkpoint","seq":{seq},"hash":"{digest}",'
            f'"kid":"{key.id}","time":"{time}","mac":"{mac}"}}\n').encode()


def checkpoint_signed(key: AuditKey, checkpoint: Mapping[str, Any]) -> bool:
    return key.signed(_checkpoint_message(checkpoint["seq"], checkpoint["hash"],
                                          checkpoint["kid"], checkpoint["time"]),
                      checkpoint["mac"])


def head_bytes(key: AuditKey, seq: int, digest: str, file: str) -> bytes:
    """The head file's whole content: JSON padded with spaces to ``HEAD_SIZE`` bytes."""
    mac = key.sign(_head_message(seq, digest, file, key.id))
    text = json.dumps({"v": VERSION, "seq": seq, "hash": digest, "file": file, "kid": key.id,
                       "mac": mac}, separators=(",", ":"))
    return text.encode().ljust(HEAD_SIZE - 1) + b"\n"


def head_signed(key: AuditKey, head: Mapping[str, Any]) -> bool:
    return key.signed(_head_message(head["seq"], head["hash"], head["file"], head["kid"]),
                      head["mac"])


@dataclass(frozen=True)
class Line:
    """One parsed line: ``kind`` is "record", "checkpoint" or "" when it is neither."""

    kind: str
    fields: Mapping[str, Any]


def parse(raw: bytes | str, shape: Mapping[str, type] | None = None) -> Line:
    """Read one line; a line that is not a well-formed record or checkpoint has kind ""."""
    try:
        value = json.loads(raw)
    except ValueError:
        return Line("", {})
    if not isinstance(value, dict):
        return Line("", {})
    if shape is not None:
        return Line("head", value) if _shaped(value, shape) else Line("", {})
    if value.get("type") == "checkpoint":
        return Line("checkpoint", value) if _shaped(value, CHECKPOINT_FIELDS) else Line("", {})
    return Line("record", value) if _shaped(value, RECORD_FIELDS) else Line("", {})


def _shaped(value: Mapping[str, Any], shape: Mapping[str, type]) -> bool:
    return all(isinstance(value.get(name), kind) and not isinstance(value.get(name), bool)
               for name, kind in shape.items())


def read_head(raw: bytes) -> Mapping[str, Any] | None:
    """The head file's fields, or ``None`` when it is empty or not a head."""
    line = parse(raw.strip() or b"null", HEAD_FIELDS)
    return line.fields if line.kind else None
