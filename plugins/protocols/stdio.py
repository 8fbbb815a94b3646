"""Standard input and output for the ``stdin`` protocol: input read in bounded chunks and
split into lines; output queued as whole lines and written by a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import stat
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

#: What ``Input.lines()`` yields for a line longer than the limit (its bytes are dropped).
TOO_LONG = object()
CHUNK = 1 << 16
#: Bytes queued for standard output past which ``Output.drain`` waits.
BUFFER_LIMIT = 1 << 20


class Input:
    """Standard input in chunks. A pipe or socket is read through the event loop; a file or
    a terminal by a daemon thread, because a pipe transport refuses regular files and would
    make a terminal (shared with stdout and stderr) non-blocking for everyone."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd, self.limit, self.kind = fd, limit, "closed"
        self.reader: asyncio.StreamReader | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.wanted: queue.SimpleQueue[asyncio.Future[bytes] | None] = queue.SimpleQueue()

    async def open(self) -> None:
        try:
            mode = os.fstat(self.fd).st_mode
        except OSError:
            return  # no standard input at all reads as an empty one
        loop = asyncio.get_running_loop()
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            self.kind, reader = "pipe", asyncio.StreamReader(limit=CHUNK)
            self.reader = reader
            self.transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader),
                os.fdopen(self.fd, "rb", buffering=0, closefd=False))
        else:
            self.kind = "file" if stat.S_ISREG(mode) else "terminal"
            threading.Thread(target=self._read_blocking, args=(loop,), name="inferno-stdin",
                             daemon=True).start()

    def _read_blocking(self, loop: asyncio.AbstractEventLoop) -> None:
        """One chunk each time the loop asks, so that reading pauses when the loop does."""
        while (future := self.wanted.get()) is not None:
            try:
                data: bytes | OSError = os.read(self.fd, CHUNK)
            except OSError as exc:
                data = exc
            try:
                loop.call_soon_threadsafe(_settle, future, data)
            except RuntimeError:
                return  # the loop is closed: Inferno is exiting

    async def read(self) -> bytes:
        if self.reader is not None:
            return await self.reader.read(CHUNK)
        if self.kind == "closed":
            return b""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.wanted.put(future)
        return await future

    async def lines(self) -> AsyncIterator[tuple[int, Any]]:
        """``(number, bytes)`` per line, numbered from 1, or ``(number, TOO_LONG)``; memory
        stays within the limit plus a chunk whatever the input holds."""
        number, pending, skipping = 0, b"", False
        while chunk := await self.read():
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                number += 1
                line = pending + chunk[start:end] if pending else chunk[start:end]
                start, pending = end + 1, b""
                too_long, skipping = skipping or len(line) > self.limit, False
                yield number, TOO_LONG if too_long else line.removesuffix(b"\r")
            if not skipping:
                pending += chunk[start:]
                if len(pending) > self.limit:
                    skipping, pending = True, b""
        if skipping or pending:
            yield number + 1, TOO_LONG if skipping else pending.removesuffix(b"\r")

    def close(self) -> None:
        self.wanted.put(None)
        if self.transport is not None:
            self.transport.close()
            with contextlib.suppress(OSError):
                os.set_blocking(self.fd, True)  # as it was, for whoever shares the pipe


def _settle(future: asyncio.Future[bytes], data: bytes | OSError) -> None:
    if not future.done():
        if isinstance(data, OSError):
            future.set_exception(data)
        else:
            future.set_result(data)


class Output:
    """Standard output, written by a thread of its own: a reader that is slow, or has stopped
    reading, never blocks the event loop (signals, other protocols and health checks go on).

    ``write`` queues whole lines and returns at once; the thread writes them in order, so
    lines never interleave. Past ``limit`` queued bytes ``drain`` waits, so that a slow reader
    slows Inferno down instead of filling its memory.

    It writes to a duplicate of descriptor 1, so that a library that redirects descriptor 1
    for a while (llama-cpp-python does during a load unless Inferno stops it) cannot swallow
    answers. Once the reader is gone (EPIPE) writes are dropped and /dev/null takes
    descriptor 1's place, so that Python's flush at exit stays quiet."""

    def __init__(self, on_closed: Callable[[OSError], None], *, fd: int = 1,
                 limit: int = BUFFER_LIMIT) -> None:
        self.loop = asyncio.get_running_loop()
        self.on_closed, self.limit, self.fd = on_closed, limit, -1
        #: No more writes are taken (closed, or the reader is gone).
        self.closed = False
        #: Whether ``drain`` and ``flush`` wait; off once Inferno stops (see ``release``).
        self.pacing = True
        #: Bytes taken by ``write`` and not yet written, and bytes written so far.
        self.queued = self.written = 0
        self._lines: list[bytes] = []
        self._ending = False  # the thread ends once it wrote what is queued
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        #: ``(queued bytes at most, future)``: coroutines waiting for the thread to catch up.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        try:
            self.fd = os.dup(fd)
        except OSError:
            self.closed = True  # no standard output at all: answers have nowhere to go
            return
        threading.Thread(target=self._run, name="inferno-stdout", daemon=True).start()

    def write(self, data: bytes) -> None:
        """Queue whole lines; cheap, and never blocks."""
        with self._lock:
            if self.closed:
                return
            self._lines.append(data)
            self.queued += len(data)
            self._wake.notify()

    async def drain(self) -> None:
        """Wait while more than ``limit`` bytes are queued; returns at once below it."""
        if self.queued > self.limit:
            await self._until(self.limit)

    async def flush(self) -> None:
        """Wait until everything queued is written (or the reader is gone)."""
        if self.queued:
            await self._until(0)

    def release(self) -> None:
        """Inferno is stopping and reads no more input: from now on ``drain`` and ``flush``
        return at once, and ``finish`` writes what is left within its time."""
        self.pacing = False
        self._settle(self._take_waiters(None))

    async def finish(self, timeout: float, stall: float) -> bool:
        """Write what is queued, then close; give up after ``timeout`` seconds, or once
        standard output took nothing for ``stall`` seconds (a reader that stopped reading).
        ``True`` when everything was written."""
        deadline = self.loop.time() + timeout
        progress = -1
        while self.queued and not self.closed and self.written != progress:
            progress, left = self.written, deadline - self.loop.time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._until(0, always=True), min(stall, left))
        done = not self.queued
        self.close()
        return done

    def close(self) -> None:
        """Take no more writes. The thread writes what is still queued and ends (or is left
        blocked, if the reader never reads again, until the process exits)."""
        with self._lock:
            self.closed = self._ending = True
            self._wake.notify()
        self._settle(self._take_waiters(None))

    async def _until(self, queued: int, always: bool = False) -> None:
        waiter = self.loop.create_future()
        with self._lock:
            if self.queued <= queued or self.closed or not (self.pacing or always):
                return
            self._waiters.append((queued, waiter))
        await waiter

    def _take_waiters(self, queued: int | None) -> list[asyncio.Future[None]]:
        """The waiters that ``queued`` bytes satisfy (all of them for ``None``)."""
        with self._lock:
            due = [w for q, w in self._waiters if queued is None or queued <= q]
            self._waiters = [(q, w) for q, w in self._waiters if w not in due]
        return due

    @staticmethod
    def _settle(waiters: list[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        try:
            while (chunk := self._next_chunk()) is not None:
                error = self._write_all(chunk)
                if error is not None:
                    self._reader_gone(error)
                    return
                with self._lock:
                    self.queued -= len(chunk)
                    queued, waiting = self.queued, bool(self._waiters)
                if waiting:  # a hop to the loop only when a coroutine waits for one
                    self._on_loop(self._settle, self._take_waiters(queued))
        finally:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def _next_chunk(self) -> bytes | None:
        """Everything queued, as one write; ``None`` once closed and written."""
        with self._lock:
            while not self._lines and not self._ending:
                self._wake.wait()
            if not self._lines:
                return None
            chunk = self._lines[0] if len(self._lines) == 1 else b"".join(self._lines)
            self._lines.clear()
            return chunk

    def _write_all(self, data: bytes) -> OSError | None:
        view = memoryview(data)
        try:
            while view:
                try:
                    written = os.write(self.fd, view)
                except BlockingIOError:  # a descriptor inherited non-blocking
                    select.select([], [self.fd], [])
                    continue
                view = view[written:]
                self.written += written
        except OSError as exc:
            return exc
        return None

    def _reader_gone(self, error: OSError) -> None:
        with self._lock:
            self.closed = self._ending = True
            self._lines.clear()
            self.queued = 0
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
        self._on_loop(self._closed_by_reader, self._take_waiters(None), error)

    def _closed_by_reader(self, waiters: list[asyncio.Future[None]], error: OSError) -> None:
        self._settle(waiters)
        self.on_closed(error)

    def _on_loop(self, callback: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: Inferno is exiting
            self.loop.call_soon_threadsafe(callback, *args)
