"""Standard input and output for the ``stdin`` protocol: input read in bounded chunks and
split into lines, output written one whole line at a time."""

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
    """Standard output, each line one blocking write: lines never interleave, and a slow
    reader slows Inferno down instead of filling its memory.

    It writes to a duplicate of descriptor 1, so that a library that redirects descriptor 1
    for a while (llama-cpp-python does during a load unless Inferno stops it) cannot swallow
    answers. Once the reader is gone (EPIPE) writes are dropped and /dev/null takes
    descriptor 1's place, so that Python's flush at exit stays quiet."""

    def __init__(self, on_closed: Callable[[OSError], None]) -> None:
        self.on_closed, self.closed, self.fd = on_closed, False, -1
        try:
            self.fd = os.dup(1)
        except OSError:
            self.closed = True  # no standard output at all: answers have nowhere to go

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            while data:
                try:
                    data = data[os.write(self.fd, data):]
                except BlockingIOError:  # a descriptor inherited non-blocking
                    select.select([], [self.fd], [])
        except OSError as exc:
            self.close()
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.close(devnull)
            self.on_closed(exc)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                os.close(self.fd)
