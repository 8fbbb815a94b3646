"""The writer: appends sealed, chained records to the log and keeps its head current.

``record`` returns once the record is in the file (flushed to the operating system) and,
with ``fsync = "always"``, on disk. Appends take an exclusive ``flock`` on the head file,
so several processes (a server and ``inferno keys create`` in a shell) may share one log:
a writer that finds the head or the file changed since its own last append reads the
tail and continues the chain from there. Records that arrive while a commit waits for the
disk or the lock are written together and share one fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from inferno.kernel.logs import get_logger
from inferno.kernel.validation import MASK, is_secret

from .errors import AuditUnavailable
from .files import HEAD_NAME, date_of, log_files, log_name, read_tail, today
from .keys import Keyring
from .records import GENESIS, HEAD_SIZE, checkpoint_line, head_bytes, read_head, seal
from .settings import AuditSettings


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def event_json(action: str, outcome: str, *, principal: Any, source: str, request_id: str,
               resource: str, details: Mapping[str, Any] | None) -> bytes:
    """A record's plaintext. Detail keys that name secrets (``token``, ``api_key``) are
    masked, so a caller's mistake cannot put a credential in the log."""
    who = getattr(principal, "id", principal)
    event = {"time": now_iso(), "principal": None if who is None else str(who),
             "source": source, "request_id": request_id, "action": action,
             "resource": resource, "outcome": outcome,
             "details": _scrubbed(details) if details else {}}
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _scrubbed(details: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): MASK if is_secret(str(k)) and v not in ("", None)
            else _scrubbed(v) if isinstance(v, Mapping) else v for k, v in details.items()}


class AuditLog:
    """The tamper-evident audit log, offered to other plugins as the ``audit`` service."""

    def __init__(self, settings: AuditSettings, keyring: Keyring,
                 log: structlog.typing.FilteringBoundLogger | None = None) -> None:
        self.settings = settings
        self.keyring = keyring
        self.key = keyring.current
        #: Whether actions whose record cannot be written are refused (callers check it).
        self.fail_closed = settings.fail_closed
        self.directory = settings.directory
        self.log = log or get_logger("audit")
        self._head_fd = -1
        self._fd = -1
        self._file = ""
        self._date = ""
        self._size = 0
        self._seq = 0
        self._hash = GENESIS
        self._checkpointed = True
        self._head_seen = b""
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._syncer: asyncio.Task[None] | None = None
        self._sync_failure = ""
        self._dirty = False
        self._closed = True

    @classmethod
    async def open(cls, settings: AuditSettings, keyring: Keyring,
                   log: structlog.typing.FilteringBoundLogger | None = None) -> AuditLog:
        """Open (or create) the log in ``settings.directory``; ``AuditUnavailable`` if not."""
        audit = cls(settings, keyring, log)
        try:
            await asyncio.to_thread(audit._open)
        except OSError as exc:
            audit._close_fds()
            raise AuditUnavailable(f"cannot open the audit log in {audit.directory}: "
                                   f"{exc.strerror or exc}") from None
        audit._closed = False
        if settings.fsync == "interval":
            audit._syncer = asyncio.get_running_loop().create_task(audit._sync_every(),
                                                                   name="audit-fsync")
        return audit

    def __repr__(self) -> str:
        return f"AuditLog({str(self.directory)!r}, key_id={self.key.id!r}, seq={self._seq})"

    @property
    def seq(self) -> int:
        """The seq of the newest record this writer knows of."""
        return self._seq

    # ------------------------------------------------------------------ recording

    async def record(self, action: str, outcome: str, *, principal: Any = None,
                     source: str = "", request_id: str = "", resource: str = "",
                     details: Mapping[str, Any] | None = None) -> None:
        """Append one record; return once it is written (and synced, per ``fsync``).

        Raises ``AuditUnavailable`` when it cannot be written (a full disk, a lost mount).
        """
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        if self._sync_failure:
            failure, self._sync_failure = self._sync_failure, ""
            raise AuditUnavailable(f"the audit log could not be synced to disk: {failure}")
        plaintext = event_json(action, outcome, principal=principal, source=source,
                               request_id=request_id, resource=resource, details=details)
        if self.settings.fsync != "always" and not self._pending and \
                (self._committer is None or self._committer.done()) and self._append_now(plaintext):
            return
        future = asyncio.get_running_loop().create_future()
        self._pending.append((plaintext, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(self._drain(),
                                                                     name="audit-commit")
        await future

    def _append_now(self, plaintext: bytes) -> bool:
        """The fast path: append without waiting, when the lock is free and no rotation is
        due (rotating syncs the old file, which is not done on the event loop)."""
        try:
            fcntl.flock(self._head_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise self._unavailable(exc) from None
        try:
            self._catch_up()
            if self._rotation_due():
                return False
            self._append(plaintext)
            self._write_head()
            return True
        except OSError as exc:
            raise self._unavailable(exc) from None
        finally:
            fcntl.flock(self._head_fd, fcntl.LOCK_UN)

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._commit([plaintext for plaintext, _ in batch])
            except Exception as exc:
                failure = exc if isinstance(exc, AuditUnavailable) else self._unavailable(exc)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def _commit(self, batch: list[bytes]) -> None:
        await self._lock()
        try:
            self._catch_up()
            for plaintext in batch:
                if self._rotation_due():
                    await self._rotate()
                self._append(plaintext)
            if self.settings.fsync == "always":
                await asyncio.to_thread(os.fsync, self._fd)
                self._dirty = False
            self._write_head()
        finally:
            fcntl.flock(self._head_fd, fcntl.LOCK_UN)

    async def _lock(self) -> None:
        try:
            fcntl.flock(self._head_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            await asyncio.to_thread(fcntl.flock, self._head_fd, fcntl.LOCK_EX)

    def _append(self, plaintext: bytes) -> None:
        seq = self._seq + 1
        line, digest = seal(self.key, seq, self._hash, plaintext)
        checkpoint = seq % self.settings.checkpoint_every == 0
        if checkpoint:
            line += checkpoint_line(self.key, seq, digest, now_iso())
        self._write(line)
        self._seq, self._hash, self._checkpointed = seq, digest, checkpoint

    def _write(self, data: bytes) -> None:
        """Write ``data`` whole or not at all: a partial write (a disk filling up) is cut
        off again, so the file never ends in half a line."""
        start, done = self._size, 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise
        self._size += len(data)
        self._dirty = True

    def _write_head(self) -> None:
        content = head_bytes(self.key, self._seq, self._hash, self._file)
        os.pwrite(self._head_fd, content, 0)
        self._head_seen = content

    def _unavailable(self, exc: BaseException) -> AuditUnavailable:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = self.directory / self._file if self._file else self.directory
        return AuditUnavailable(f"cannot write the audit log {where}: {reason}")

    # ------------------------------------------------------------------ files

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._head_fd = os.open(self.directory / HEAD_NAME,
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._head_fd, fcntl.LOCK_EX)
        try:
            self._catch_up()
        finally:
            fcntl.flock(self._head_fd, fcntl.LOCK_UN)

    def _catch_up(self) -> None:
        """Under the lock: make sure the chain continues from the newest record on disk,
        whoever wrote it. Cheap when nobody else wrote: one read of the head, one stat."""
        head = os.pread(self._head_fd, HEAD_SIZE, 0)
        if self._fd >= 0 and head == self._head_seen and \
                os.fstat(self._fd).st_size == self._size:
            return
        self._head_seen = head
        name, tail = "", None
        for candidate in reversed(log_files(self.directory)):
            tail = read_tail(self.directory / candidate, repair=True)
            if tail is not None:
                name = candidate
                break
        seq, digest = (tail.seq, tail.hash) if tail else (0, GENESIS)
        self._checkpointed = tail.checkpointed if tail else True
        fields = read_head(head)
        if fields is not None and int(fields["seq"]) > seq:
            self.log.error("the audit log ends before the record its head names: continuing "
                           "after that record, so the loss stays visible to `inferno audit "
                           "verify`", log_ends_at=seq, head_seq=fields["seq"])
            seq, digest, self._checkpointed = int(fields["seq"]), str(fields["hash"]), False
        if name != self._file or self._fd < 0:
            self._close_file()
            if name:
                self._open_file(name)
        self._size = os.fstat(self._fd).st_size if self._fd >= 0 else 0
        self._seq, self._hash = seq, digest

    def _rotation_due(self) -> bool:
        return self._fd < 0 or self._size >= self.settings.max_bytes or \
            (self.settings.rotate_daily and self._date != today())

    async def _rotate(self) -> None:
        """Close the current file with a signed checkpoint and start the next one."""
        if self._fd >= 0:
            if not self._checkpointed:
                self._write(checkpoint_line(self.key, self._seq, self._hash, now_iso()))
                self._checkpointed = True
            if self.settings.fsync != "never":
                await asyncio.to_thread(os.fsync, self._fd)
            self._close_file()
        self._open_file(log_name(self._seq + 1, today()))
        self._size = os.fstat(self._fd).st_size
        if self.settings.fsync != "never":
            await asyncio.to_thread(_sync_directory, self.directory)

    def _open_file(self, name: str) -> None:
        self._fd = os.open(self.directory / name,
                           os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file, self._date = name, date_of(name)

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._file, self._date = -1, "", ""

    def _close_fds(self) -> None:
        self._close_file()
        if self._head_fd >= 0:
            os.close(self._head_fd)
            self._head_fd = -1

    # ------------------------------------------------------------------ durability, closing

    async def _sync_every(self) -> None:
        """``fsync = "interval"``: sync what was written, at most ``fsync_interval`` later."""
        while True:
            await asyncio.sleep(self.settings.fsync_interval)
            if self._dirty and self._fd >= 0:
                await self._sync_quietly()

    async def _sync_quietly(self) -> None:
        self._dirty = False
        fd = os.dup(self._fd)
        try:
            await asyncio.to_thread(os.fsync, fd)
        except OSError as exc:
            self._sync_failure = exc.strerror or str(exc)
            self.log.error("audit log fsync failed", error=self._sync_failure)
        finally:
            os.close(fd)

    async def close(self) -> None:
        """Write what is pending, sign the end with a checkpoint, sync and close."""
        if self._closed:
            return
        self._closed = True
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
        try:
            await self._lock()
            try:
                self._catch_up()
                if self._fd >= 0 and not self._checkpointed:
                    self._write(checkpoint_line(self.key, self._seq, self._hash, now_iso()))
                    self._checkpointed = True
                if self._fd >= 0 and self.settings.fsync != "never":
                    await asyncio.to_thread(os.fsync, self._fd)
            finally:
                fcntl.flock(self._head_fd, fcntl.LOCK_UN)
        except OSError as exc:
            self.log.error("could not close the audit log cleanly",
                           error=str(self._unavailable(exc)))
        finally:
            self._close_fds()


def _sync_directory(directory: os.PathLike[str]) -> None:
    """Make a new file's name durable, not only its content."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
