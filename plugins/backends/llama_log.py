"""llama.cpp's log, captured for one piece of work: a model load or a quantisation.

llama.cpp has one log callback for the whole process. ``capture`` installs its
own for the length of a block, keeps the lines logged from the calling thread
(lines from other threads go on to whoever listened before), and restores the
previous callback afterwards. Captures take turns, so that each restores what
the one before it installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import llama_cpp

_TURNS = threading.Lock()
_FAILURE = re.compile(r"\b(error|failed|invalid|requires)\b", re.IGNORECASE)


class LlamaLines:
    """The lines llama.cpp logged from one thread during a capture."""

    def __init__(self, on_line: Callable[[str], None], previous: Any, previous_data: Any) -> None:
        self.lines: list[str] = []
        self.failure: BaseException | None = None
        self._pending = ""
        self._on_line = on_line
        self._previous, self._previous_data = previous, previous_data
        self._thread = threading.get_ident()
        self.callback = llama_cpp.llama_log_callback(self._receive)

    def _receive(self, level: int, text: bytes, user_data: Any) -> None:
        if threading.get_ident() != self._thread:
            if self._previous:
                self._previous(level, text, self._previous_data)
            return
        self._pending += text.decode("utf-8", errors="replace")
        *complete, self._pending = self._pending.split("\n")
        for line in complete:
            self.lines.append(line)
            if self.failure is None:
                try:
                    self._on_line(line)
                except BaseException as error:  # ctypes would swallow it: re-raised on return
                    self.failure = error

    def reason(self) -> str:
        """What llama.cpp said went wrong: its failure lines, else its last line.

        Whole words only: a metadata key such as ``unknown_token_id`` in the load's dump of
        the file's header is no reason."""
        errors = [line.strip() for line in self.lines if _FAILURE.search(line)]
        if not errors and self.lines:
            errors = [self.lines[-1].strip()]
        return "; ".join(dict.fromkeys(errors)) or "llama.cpp gave no reason"


def _ignore(_line: str) -> None:
    pass


@contextlib.contextmanager
def capture(on_line: Callable[[str], None] = _ignore) -> Iterator[LlamaLines]:
    """Route llama.cpp's log from this thread through ``on_line`` for the block; an exception
    ``on_line`` raises is raised when the block ends."""
    with _TURNS:
        previous, previous_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
        lines = LlamaLines(on_line, previous, previous_data)
        llama_cpp.llama_log_set(lines.callback, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            llama_cpp.llama_log_set(previous, previous_data)
    if lines.failure is not None:
        raise lines.failure


def offload_counter() -> tuple[Callable[[str], None], Callable[[], tuple[int, int] | None]]:
    """An ``on_line`` that notes llama.cpp's ``offloaded N/M layers to GPU`` line as it
    arrives (a CUDA load logs hundreds of lines after it), and a function that reads it."""
    found: list[tuple[int, int]] = []

    def on_line(line: str) -> None:
        match = re.search(r"offloaded (\d+)/(\d+) layers to GPU", line)
        if match:
            found.append((int(match.group(1)), int(match.group(2))))

    return on_line, lambda: found[-1] if found else None
