"""The API key store: keys kept only as SHA-256 hashes in one SQLite file.

A key is ``inf_<id>_<secret>``: 12 hex digits of public id, which find the row by its
primary key, and 64 hex digits (256 bits from :mod:`secrets`) of secret. The row holds
the SHA-256 of the whole key, compared in constant time. A fast hash is enough: nobody
can search 2**256 secrets, and a slow one would cost every request milliseconds.

Several Inferno processes may open the same file (WAL mode, a busy timeout). Nothing is
cached between lookups: each one is a read transaction of its own, so a key another
process revoked stops working with the next request. Lookups use one connection, writes
another, so a write waiting on another process's lock never holds a lookup up.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from inferno.kernel import InfernoError

PREFIX = "inf_"
_KEY = re.compile(r"inf_([0-9a-f]{12})_([0-9a-f]{64})")
SCHEMA_VERSION = 1
#: The per-key limits the rate limiter reads from ``principal.attributes["limits"]``.
LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "concurrent")
_COLUMNS = ("id, name, owner, roles, models, limits, expires_at, created_at, last_used_at, "
            "revoked_at, replaced_by")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    roles TEXT NOT NULL,
    models TEXT NOT NULL,
    limits TEXT NOT NULL,
    expires_at REAL,
    created_at REAL NOT NULL,
    last_used_at REAL,
    revoked_at REAL,
    replaced_by TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS keys_unrevoked_name ON keys (name) WHERE revoked_at IS NULL;
"""


class KeyStoreError(InfernoError):
    """A key store operation that cannot be done; the message says why."""


class KeyNotFound(KeyStoreError):
    """No key has this id, and no unrevoked key this name."""


class KeyConflict(KeyStoreError):
    """The operation clashes with the store's state (a name in use, a key already revoked)."""


def iso(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC (``2027-01-01T00:00:00Z``)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class KeyRecord:
    """What the store knows of a key: everything but the key itself."""

    id: str
    name: str
    owner: str
    roles: tuple[str, ...]
    #: Models the key may use; empty: every model.
    models: tuple[str, ...]
    limits: Mapping[str, int] = field(default_factory=dict)
    expires_at: float | None = None
    created_at: float = 0.0
    last_used_at: float | None = None
    revoked_at: float | None = None
    #: The key that replaced this one when it was rotated.
    replaced_by: str | None = None

    def status(self, now: float | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or time.time()):
            return "expired"
        return "active"

    def public(self) -> dict[str, Any]:
        """The record as JSON: what ``keys list`` and ``GET /api/v1/keys`` show."""
        return {"id": self.id, "name": self.name, "owner": self.owner,
                "roles": list(self.roles), "models": list(self.models),
                "limits": dict(self.limits), "status": self.status(),
                "expires_at": iso(self.expires_at), "created_at": iso(self.created_at),
                "last_used_at": iso(self.last_used_at), "revoked_at": iso(self.revoked_at),
                "replaced_by": self.replaced_by}


@dataclass(frozen=True)
class Rejected:
    """Why a presented key does not authenticate; ``record`` for a revoked or expired key."""

    reason: Literal["malformed", "unknown", "revoked", "expired"]
    record: KeyRecord | None = None


def parse_key(key: str) -> str | None:
    """The id part of a well-formed key, else ``None``."""
    match = _KEY.fullmatch(key)
    return match.group(1) if match else None


def parse_expiry(text: str, now: float | None = None) -> float | None:
    """``30d``, ``12h``, ``2w``, an ISO date or time (UTC unless it says otherwise), or
    ``never``/``""`` for none, as a Unix time in the future."""
    text = text.strip()
    now = time.time() if now is None else now
    if text.lower() in ("", "never", "none"):
        return None
    relative = re.fullmatch(r"(\d{1,6})\s*([hdw])", text.lower())
    if relative:
        unit = {"h": 3600, "d": 86400, "w": 7 * 86400}[relative.group(2)]
        amount = int(relative.group(1)) * unit
        if amount <= 0:
            raise KeyStoreError(f"expiry {text!r} is not in the future")
        return now + amount
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise KeyStoreError(f"expiry {text!r} is neither a duration like '30d', '12h' or "
                            f"'2w' nor an ISO date like '2027-01-01'") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment.timestamp() <= now:
        raise KeyStoreError(f"expiry {text!r} is in the past")
    return moment.timestamp()


def check_limits(limits: Mapping[str, Any]) -> dict[str, int]:
    """The limits a key may carry, each a positive integer."""
    unknown = sorted(set(limits) - set(LIMIT_NAMES))
    if unknown:
        raise KeyStoreError(f"unknown limit {unknown[0]!r}; known: {', '.join(LIMIT_NAMES)}")
    checked = {}
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KeyStoreError(f"limit {name} must be a positive integer, got {value!r}")
        checked[name] = value
    return checked


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _find(db: sqlite3.Connection, ref: str) -> KeyRecord:
    """The key whose id is ``ref``, else the unrevoked key named ``ref``."""
    row = db.execute(f"SELECT {_COLUMNS} FROM keys WHERE id = ? OR (name = ? AND revoked_at "
                     f"IS NULL) ORDER BY id = ? DESC LIMIT 1", (ref, ref, ref)).fetchone()
    if row is None:
        raise KeyNotFound(f"no API key with id {ref!r} and no unrevoked key named {ref!r}")
    return _record(row)


def _revoke(db: sqlite3.Connection, ref: str, if_revoked: str) -> tuple[KeyRecord, float]:
    """Revoke the key ``ref`` inside a transaction: its record and when; ``KeyConflict``
    (``if_revoked``, with ``{when}``) for a key revoked already."""
    record = _find(db, ref)
    if record.revoked_at is not None:
        raise KeyConflict(f"API key {record.id} ({record.name}) "
                          + if_revoked.format(when=iso(record.revoked_at)))
    now = time.time()
    db.execute("UPDATE keys SET revoked_at = ? WHERE id = ?", (now, record.id))
    return record, now


def _record(row: Sequence[Any]) -> KeyRecord:
    return KeyRecord(id=row[0], name=row[1], owner=row[2], roles=tuple(json.loads(row[3])),
                     models=tuple(json.loads(row[4])), limits=json.loads(row[5]),
                     expires_at=row[6], created_at=row[7], last_used_at=row[8],
                     revoked_at=row[9], replaced_by=row[10])


class KeyStore:
    """API keys in the SQLite file ``path``, created with permissions 0600.

    Thread-safe: each of its two connections is used by one thread at a time. Its methods
    block (a write may wait ``busy_timeout`` seconds for another process's lock).
    """

    def __init__(self, path: Path, *, last_used_interval: float = 60.0,
                 busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.last_used_interval = last_used_interval
        #: When this process last wrote each key's last-used time (throttling).
        self._touched: dict[str, float] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite keeps the mode
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer = self._connect(busy_timeout)
        try:
            self._migrate()
        except BaseException:
            self._writer.close()
            raise
        self._reader = self._connect(busy_timeout)

    def _connect(self, busy_timeout: float) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise KeyStoreError(f"{self.path}: cannot open the key store: {exc}") from None
        return db

    def _migrate(self) -> None:
        """Create the schema, or check that this Inferno can read the one there."""
        with self._transaction() as db:
            for statement in _SCHEMA.split(";")[:-1]:  # executescript would commit first
                db.execute(statement)
            found = db.execute("SELECT version FROM schema_version").fetchone()
            if found is None:
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif found[0] > SCHEMA_VERSION:
                raise KeyStoreError(f"{self.path}: key store schema {found[0]} was written "
                                    f"by a newer Inferno (this one reads {SCHEMA_VERSION})")

    def close(self) -> None:
        self._reader.close()
        self._writer.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the file's write lock at once (no upgrade
        deadlock between processes)."""
        with self._write_lock:
            db = self._writer
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise KeyStoreError(f"{self.path}: the key store is busy: {exc}") from None
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------ reading

    def lookup(self, key: str, now: float | None = None) -> KeyRecord | Rejected:
        """The record of a valid key, or why it is not: one indexed read, no cache."""
        key_id = parse_key(key)
        if key_id is None:
            return Rejected("malformed")
        with self._read_lock:
            row = self._reader.execute(f"SELECT {_COLUMNS}, hash FROM keys WHERE id = ?",
                                       (key_id,)).fetchone()
        if row is None or not hmac.compare_digest(_hash(key), row[11]):
            return Rejected("unknown")
        record = _record(row)
        status = record.status(now)
        if status != "active":
            return Rejected("revoked" if status == "revoked" else "expired", record)
        return record

    def get(self, ref: str) -> KeyRecord:
        """A key by id, or the unrevoked key of that name."""
        with self._read_lock:
            return _find(self._reader, ref)

    def list(self, *, include_revoked: bool = False) -> list[KeyRecord]:
        """Keys, oldest first; revoked ones only when asked for."""
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        with self._read_lock:
            rows = self._reader.execute(
                f"SELECT {_COLUMNS} FROM keys{where} ORDER BY created_at, id").fetchall()
        return [_record(row) for row in rows]

    # ------------------------------------------------------------------ writing

    def create(self, name: str, *, roles: Sequence[str], owner: str = "",
               models: Sequence[str] = (), limits: Mapping[str, int] | None = None,
               expires_at: float | None = None) -> tuple[KeyRecord, str]:
        """A new key and its record; the key is never stored and cannot be shown again."""
        with self._transaction() as db:
            return self._insert(db, name, roles=roles, owner=owner, models=models,
                                limits=check_limits(limits or {}), expires_at=expires_at)

    def _insert(self, db: sqlite3.Connection, name: str, *, roles: Sequence[str], owner: str,
                models: Sequence[str], limits: Mapping[str, int], expires_at: float | None
                ) -> tuple[KeyRecord, str]:
        taken = db.execute("SELECT id FROM keys WHERE name = ? AND revoked_at IS NULL",
                           (name,)).fetchone()
        if taken is not None:
            raise KeyConflict(f"an unrevoked API key named {name!r} exists (id {taken[0]}); "
                              f"rotate or revoke it, or choose another name")
        while True:
            key_id = secrets.token_hex(6)
            key = f"{PREFIX}{key_id}_{secrets.token_hex(32)}"
            if db.execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone() is None:
                break
        record = KeyRecord(id=key_id, name=name, owner=owner, roles=tuple(roles),
                           models=tuple(models), limits=dict(limits), expires_at=expires_at,
                           created_at=time.time())
        db.execute(f"INSERT INTO keys ({_COLUMNS}, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                   (record.id, name, owner, json.dumps(list(roles)), json.dumps(list(models)),
                    json.dumps(record.limits), expires_at, record.created_at, None, None, None,
                    _hash(key)))
        return record, key

    def revoke(self, ref: str) -> KeyRecord:
        """Revoke a key by id or name; every process sharing the file refuses it from its
        next lookup on."""
        with self._transaction() as db:
            record, now = _revoke(db, ref, "was already revoked at {when}")
        return replace(record, revoked_at=now)

    def rotate(self, ref: str, *, expires_at: float | Literal["keep"] | None = "keep"
               ) -> tuple[KeyRecord, str, KeyRecord]:
        """Replace a key with a new one of the same name, owner, roles, models, limits and
        (unless ``expires_at`` is given) expiry; the old key is revoked at once. Returns the
        new record, the new key and the old record."""
        with self._transaction() as db:
            old, now = _revoke(db, ref, "is revoked; create a new key instead")
            new, key = self._insert(db, old.name, roles=old.roles, owner=old.owner,
                                    models=old.models, limits=old.limits,
                                    expires_at=old.expires_at if expires_at == "keep"
                                    else expires_at)
            db.execute("UPDATE keys SET replaced_by = ? WHERE id = ?", (new.id, old.id))
        return new, key, replace(old, revoked_at=now, replaced_by=new.id)

    def withdraw(self, record: KeyRecord) -> None:
        """Undo the creation of ``record`` moments ago (its creation could not be audited):
        the row goes, and the key it replaced in a rotation is unrevoked."""
        with self._transaction() as db:
            db.execute("DELETE FROM keys WHERE id = ?", (record.id,))
            db.execute("UPDATE keys SET revoked_at = NULL, replaced_by = NULL "
                       "WHERE replaced_by = ?", (record.id,))

    # ------------------------------------------------------------------ last used

    def due(self, record: KeyRecord, now: float) -> bool:
        """Whether ``record``'s last-used time is older than ``last_used_interval`` both in
        the store and as this process last wrote it."""
        last = max(record.last_used_at or 0.0, self._touched.get(record.id, 0.0))
        return now - last >= self.last_used_interval

    def touch(self, record: KeyRecord, now: float | None = None) -> bool:
        """Write ``record``'s last-used time, at most once per ``last_used_interval`` seconds
        per key in this process; ``True`` when it wrote."""
        now = time.time() if now is None else now
        if not self.due(record, now):
            return False
        self._touched[record.id] = now
        with self._transaction() as db:
            db.execute("UPDATE keys SET last_used_at = ? WHERE id = ? AND "
                       "(last_used_at IS NULL OR last_used_at < ?)", (now, record.id, now))
        return True


__all__ = ["LIMIT_NAMES", "PREFIX", "KeyConflict", "KeyNotFound", "KeyRecord", "KeyStore",
           "KeyStoreError", "Rejected", "check_limits", "iso", "parse_expiry", "parse_key"]
