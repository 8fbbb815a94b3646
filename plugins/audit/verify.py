"""Checking a log end to end, and reading its records back.

``verify`` walks every file in order and stops at the first problem, which it names:

- ``modified``: a record's stored hash is not the hash of its fields, it does not link
  to the record before it, its seal does not open under a key that opened records of the
  same key id, or a checkpoint or the head carries a bad signature;
- ``deleted``: the sequence skips numbers that appear nowhere later (or the head file is
  gone);
- ``reordered``: a number arrives out of turn (an earlier one follows it, or turns up
  later);
- ``truncated``: the last line is incomplete, or the head says records followed the
  last one;
- ``wrong key``: no configured key opens the records of a key id;
- ``corrupt``: a line that is not a record at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag

from .errors import AuditReadError
from .files import HEAD_NAME, Snapshot, read_lines, snapshot
from .keys import AuditKey, Keyring
from .records import (
    GENESIS,
    Line,
    checkpoint_signed,
    hash_matches,
    head_signed,
    parse,
    read_head,
    unseal,
)

REASONS = ("modified", "deleted", "reordered", "truncated", "wrong key", "corrupt")


@dataclass(frozen=True)
class Problem:
    """The first thing wrong with a log, and where."""

    reason: str
    file: str
    line: int
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{self.reason}: {where}{seq}: {self.message}"


@dataclass
class Verification:
    """What ``verify`` found: counts, and the first problem when there is one."""

    records: int = 0
    checkpoints: int = 0
    files: int = 0
    last_seq: int = 0
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class RawLine:
    index: int
    file: str
    number: int
    raw: bytes

    @property
    def complete(self) -> bool:
        return self.raw.endswith(b"\n")


def _lines(directory: Path, files: list[tuple[str, int]], start: tuple[int, int] = (0, 0)
           ) -> Iterator[RawLine]:
    """Every non-empty line of ``files`` (each up to its length) from (file index, line
    number) on."""
    for index in range(start[0], len(files)):
        name, length = files[index]
        for number, raw in enumerate(read_lines(directory / name, length), 1):
            if (index, number) > start and raw.strip():
                yield RawLine(index, name, number, raw)


class _Walk:
    """One pass of ``verify``: the chain's state and the keys proven so far."""

    def __init__(self, directory: Path, keyring: Keyring) -> None:
        self.directory = directory
        self.keyring = keyring
        self.state: Snapshot = snapshot(directory)
        self.files = self.state.files
        self.result = Verification(files=len(self.files))
        self.seq = 0
        self.hash = GENESIS
        self.proven: set[str] = set()
        self.last: RawLine | None = None

    def fail(self, reason: str, at: RawLine | None, seq: int | None, message: str) -> None:
        """Record the problem at line ``at``, or in the head file when ``at`` is ``None``."""
        file, line = (at.file, at.number) if at else (HEAD_NAME, 0)
        self.result.problem = Problem(reason, file, line, seq, message)

    def later(self, at: RawLine) -> Iterator[Line]:
        """The parsed lines after ``at`` (only looked at once a problem is found)."""
        for raw in _lines(self.directory, self.files, (at.index, at.number)):
            yield parse(raw.raw)

    def run(self) -> Verification:
        for raw in _lines(self.directory, self.files):
            self.last = raw
            if not self.step(raw):
                break
        else:
            self.check_head()
        self.result.last_seq = self.seq
        return self.result

    def step(self, raw: RawLine) -> bool:
        line = parse(raw.raw)
        if not raw.complete:
            self.fail("truncated", raw, self.seq + 1, "the last line is incomplete: the "
                      "log was cut in the middle of a record")
            return False
        if line.kind == "checkpoint":
            return self.checkpoint(raw, line.fields)
        if line.kind == "record":
            return self.record(raw, line.fields)
        follows = next((later for later in self.later(raw) if later.kind == "record"), None)
        if follows is not None and follows.fields["seq"] == self.seq + 2:
            self.fail("modified", raw, self.seq + 1, "the line in place of this record is "
                      "no longer a readable record")
        else:
            self.fail("corrupt", raw, None, "not an audit record or checkpoint")
        return False

    def out_of_turn(self, raw: RawLine, seq: int, what: str, last: int) -> bool:
        """A line whose ``seq`` is not next: say whether lines moved or went missing.
        ``last`` is the newest record the line says came before it."""
        expected = self.seq + 1
        if last < self.seq:
            self.fail("reordered", raw, seq, f"{what} {seq} comes after record {self.seq}")
        elif any(line.kind == "record" and line.fields["seq"] == expected
                 for line in self.later(raw)):
            self.fail("reordered", raw, seq, f"{what} {seq} comes before record {expected}")
        else:
            missing = f"{expected}" if last == expected else f"{expected} to {last}"
            self.fail("deleted", raw, expected, f"record {missing} is missing: the log goes "
                      f"from record {self.seq} to {what} {seq}")
        return False

    def record(self, raw: RawLine, record: Mapping[str, Any]) -> bool:
        seq = int(record["seq"])
        if not hash_matches(record):
            self.fail("modified", raw, seq, "the record's hash does not match its content")
            return False
        if seq != self.seq + 1:
            return self.out_of_turn(raw, seq, "record", seq - 1)
        if record["prev"] != self.hash:
            self.fail("modified", raw, seq, "the record does not link to the one before it")
            return False
        kid = str(record["kid"])
        if not self.opens(raw, record, kid):
            return False
        self.seq, self.hash = seq, str(record["hash"])
        self.result.records += 1
        return True

    def opens(self, raw: RawLine, record: Mapping[str, Any], kid: str) -> bool:
        candidates = self.keyring.candidates(kid)
        for key in candidates:
            if _opens(key, record):
                self.keyring.bind(kid, key)
                self.proven.add(kid)
                return True
        seq = int(record["seq"])
        if kid in self.proven:
            self.fail("modified", raw, seq, f"the record does not decrypt under key {kid!r}, "
                      f"which decrypted the records before it")
        elif any(_opens(key, later.fields) for later in self.later(raw)
                 if later.kind == "record" and later.fields["kid"] == kid for key in candidates):
            self.fail("modified", raw, seq, f"the record does not decrypt under key {kid!r}, "
                      f"which decrypts the records after it")
        else:
            have = ", ".join(sorted({self.keyring.current.id, *(k.fingerprint for k in
                                                                self.keyring.previous)}))
            self.fail("wrong key", raw, seq, f"no configured key decrypts the records of key "
                      f"id {kid!r} (configured: {have}); set audit.key, or add the key that "
                      f"wrote them to audit.previous_keys")
        return False

    def checkpoint(self, raw: RawLine, checkpoint: Mapping[str, Any]) -> bool:
        seq = int(checkpoint["seq"])
        key = self.keyring.get(str(checkpoint["kid"]))
        if key is None:
            self.fail("wrong key", raw, seq, f"no configured key for the checkpoint's key id "
                      f"{checkpoint['kid']!r}")
            return False
        if not checkpoint_signed(key, checkpoint):
            self.fail("modified", raw, seq, "the checkpoint's signature does not match")
            return False
        if seq != self.seq:
            return self.out_of_turn(raw, seq, "the checkpoint of record", seq)
        if checkpoint["hash"] != self.hash:
            self.fail("modified", raw, seq, "the chain differs from what the checkpoint signed")
            return False
        self.result.checkpoints += 1
        return True

    def check_head(self) -> None:
        raw = self.state.head
        if raw is None or not raw.strip():
            if self.seq:
                self.fail("deleted", None, None, f"the head file {HEAD_NAME} is missing or "
                          f"empty, so nothing shows whether records followed seq {self.seq}")
            return
        head = read_head(raw)
        if head is None:
            self.fail("corrupt", None, None, f"the head file {HEAD_NAME} is unreadable")
            return
        key = self.keyring.get(str(head["kid"]))
        if key is None:
            self.fail("wrong key", None, None, f"no configured key for the head's key id "
                      f"{head['kid']!r}")
            return
        if not head_signed(key, head):
            self.fail("modified", None, None, f"the head file {HEAD_NAME} has a bad signature")
            return
        seq = int(head["seq"])
        where = self.last
        if seq > self.seq:
            file = where.file if where else str(head["file"])
            line = where.number + 1 if where else 1
            self.result.problem = Problem(
                "truncated", file, line, self.seq + 1, f"the log ends at seq {self.seq}, but "
                f"its head says records were written up to seq {seq} (in {head['file']})")
        elif seq == self.seq and head["hash"] != self.hash:
            self.fail("modified", where, seq, "the newest record differs from the one the "
                      "head signed")
        elif seq < self.seq:
            self.result.notes.append(f"the head names seq {seq}, older than the newest "
                                     f"record {self.seq}: a writer stopped between the two")


def _opens(key: AuditKey, record: Mapping[str, Any]) -> bool:
    try:
        unseal(key, record)
    except (InvalidTag, ValueError):
        return False
    return True


def verify(directory: Path, keyring: Keyring) -> Verification:
    """Check every file of the log in ``directory`` in order, then the head."""
    return _Walk(directory, keyring).run()


def read_records(directory: Path, keyring: Keyring) -> Iterator[dict[str, Any]]:
    """Every record decrypted, oldest first, as ``{"seq", "key_id", **event}``."""
    for raw in _lines(directory, snapshot(directory).files):
        line = parse(raw.raw)
        if line.kind == "checkpoint" or (not line.kind and not raw.complete):
            continue
        if not line.kind:
            raise AuditReadError(f"{raw.file}:{raw.number} is not an audit record "
                                 f"(run `inferno audit verify`)")
        record = line.fields
        for key in keyring.candidates(str(record["kid"])):
            try:
                event = json.loads(unseal(key, record))
            except (InvalidTag, ValueError):
                continue
            keyring.bind(str(record["kid"]), key)
            yield {"seq": record["seq"], "key_id": record["kid"], **event}
            break
        else:
            raise AuditReadError(f"{raw.file}:{raw.number} (seq {record['seq']}) does not "
                                 f"decrypt under any configured key (run `inferno audit "
                                 f"verify`)")
