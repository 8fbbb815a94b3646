"""SHA-256 of model files, computed once and remembered in a SQLite file.

Hashing a multi-gigabyte model takes seconds to minutes, so the digest is kept against the file's
resolved path, size and modification time (in nanoseconds); a change in either of those means the
file is hashed again. Several Inferno processes may share one database: it runs in WAL mode and
every transaction is a single short statement, never held open while a file is being read.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from .errors import ModelFileError
from .formats import open_model_file

BLOCK_SIZE = 1024 * 1024
BUSY_TIMEOUT_S = 30.0
HASH_ATTEMPTS = 3
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS checksums (
    path     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256   TEXT NOT NULL
)
"""


class ChecksumCache:
    """SHA-256 digests of files, cached in the SQLite database at ``db_path``."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                with closing(self._connect()) as db:
                    db.execute("PRAGMA journal_mode=WAL")  # persistent: once for every process
                    with db:
                        db.execute(SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                # two processes creating the file at once: switching the journal mode does
                # not wait on the busy timeout, so wait here
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def sha256(self, path: Path) -> str:
        """The lowercase hex SHA-256 of the file at ``path``, from the cache when the file's
        size and modification time are those it had when it was last hashed."""
        key = str(Path(path).resolve())
        for _ in range(HASH_ATTEMPTS):
            with open_model_file(path) as file:
                before = os.fstat(file.fileno())
                cached = self._lookup(key, before.st_size, before.st_mtime_ns)
                if cached is not None:
                    return cached
                digest = hashlib.sha256()
                while block := file.read(BLOCK_SIZE):
                    digest.update(block)
                after = os.fstat(file.fileno())
            if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
                self._store(key, before.st_size, before.st_mtime_ns, digest.hexdigest())
                return digest.hexdigest()
        raise ModelFileError(path, f"changed while being hashed, {HASH_ATTEMPTS} times; wait "
                                   "until whatever is writing it has finished")

    def verify(self, path: Path, expected: str) -> None:
        """Raise ModelFileError unless the file's SHA-256 is ``expected`` (64 hex digits,
        any case, optionally prefixed "sha256:")."""
        wanted = normalise_sha256(expected)
        if wanted is None:
            raise ModelFileError(path, f"malformed expected checksum {expected!r}: give 64 hex "
                                       "digits, optionally prefixed 'sha256:'")
        actual = self.sha256(path)
        if actual != wanted:
            raise ModelFileError(path, f"checksum mismatch: expected {wanted}, got {actual}")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S)

    def _lookup(self, key: str, size: int, mtime_ns: int) -> str | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT sha256 FROM checksums WHERE path = ? AND size = ? "
                             "AND mtime_ns = ?", (key, size, mtime_ns)).fetchone()
        return None if row is None else str(row[0])

    def _store(self, key: str, size: int, mtime_ns: int, sha256: str) -> None:
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO checksums (path, size, mtime_ns, sha256) "
                       "VALUES (?, ?, ?, ?)", (key, size, mtime_ns, sha256))


def normalise_sha256(value: str) -> str | None:
    """``value`` as 64 lowercase hex digits, without a "sha256:" prefix; None if malformed."""
    digits = value.strip()
    if digits[:7].lower() == "sha256:":
        digits = digits[7:]
    digits = digits.lower()
    return digits if SHA256_HEX.fullmatch(digits) else None
