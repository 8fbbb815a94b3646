"""The log's files on disk: names that sort in order, tails, and the head file."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .records import HEAD_SIZE, parse

HEAD_NAME = "head.json"
LOG_NAME = re.compile(r"^audit-(\d{12})-(\d{8})\.jsonl$")
TAIL_CHUNK = 64 * 1024


def log_name(first_seq: int, date: str) -> str:
    """A file's name: the seq of its first record (so names sort in order), then its UTC date."""
    return f"audit-{first_seq:012d}-{date}.jsonl"


def date_of(name: str) -> str:
    match = LOG_NAME.match(name)
    return match.group(2) if match else ""


def today() -> str:
    return time.strftime("%Y%m%d", time.gmtime())


def log_files(directory: Path) -> list[str]:
    """The log's file names, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if LOG_NAME.match(name))


@dataclass(frozen=True)
class Tail:
    """Where a file's chain stands: the last record's seq and hash, and whether a
    checkpoint already signs that state."""

    seq: int
    hash: str
    checkpointed: bool


def read_tail(path: Path, *, repair: bool) -> Tail | None:
    """The state at the end of ``path``, ``None`` when it holds no readable line.

    With ``repair`` (the caller holds the log's lock) an incomplete last line, left by a
    writer that died or ran out of space mid-write, is cut off so the next line starts
    clean; the records before it are untouched.
    """
    with path.open("r+b" if repair else "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size <= 0:
            return None
        chunk, start = b"", size
        while start > 0:
            start = max(0, start - TAIL_CHUNK)
            handle.seek(start)
            chunk = handle.read(size - start)
            if chunk.count(b"\n") >= 2 or start == 0:
                break
        if repair and not chunk.endswith(b"\n"):
            keep = chunk.rfind(b"\n") + 1
            handle.truncate(start + keep)
            chunk = chunk[:keep]
        for raw in reversed(chunk.split(b"\n")):
            line = parse(raw) if raw.strip() else None
            if line is not None and line.kind:
                return Tail(int(line.fields["seq"]), str(line.fields["hash"]),
                            line.kind == "checkpoint")
    return None


@dataclass(frozen=True)
class Snapshot:
    """The log as it stood at one moment: each file's length, and the head's bytes.

    Taken under a shared lock, so no writer is half-way through a line; readers then read
    each file only up to its length, and a server that goes on appending cannot make the
    head look newer than the records read.
    """

    files: list[tuple[str, int]]
    head: bytes | None


def snapshot(directory: Path) -> Snapshot:
    try:
        descriptor = os.open(directory / HEAD_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Snapshot(_lengths(directory), None)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH)
        files = _lengths(directory)
        head = os.pread(descriptor, HEAD_SIZE, 0)
    finally:
        os.close(descriptor)  # closing releases the lock
    return Snapshot(files, head)


def _lengths(directory: Path) -> list[tuple[str, int]]:
    lengths = []
    for name in log_files(directory):
        with contextlib.suppress(FileNotFoundError):
            lengths.append((name, os.stat(directory / name).st_size))
    return lengths


def read_lines(path: Path, length: int) -> Iterator[bytes]:
    """The lines of the first ``length`` bytes of ``path``."""
    with path.open("rb") as handle:
        left = length
        for raw in handle:
            if left <= 0:
                return
            yield raw[:left]
            left -= len(raw)
