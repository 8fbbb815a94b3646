"""A real Inferno server for protocol tests: a kernel with its protocols, on loopback, in a
thread of its own so that blocking clients (the openai and ollama SDKs) can call it.

    with ServerThread("edge", data_dir) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="-")
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from inferno.kernel import Kernel

T = TypeVar("T")


class ServerThread:
    """Starts ``profile`` (port 0 unless ``sets`` say otherwise) and stops it on exit."""

    def __init__(self, profile: str | Path, data_dir: Path, sets: Sequence[str] = (),
                 *, config_file: Path | None = None) -> None:
        self.sets = [f'kernel.data_dir="{data_dir}"', "protocols.http.port=0",
                     "plugins.models.watch_interval=0", *sets]
        self.profile = str(profile)
        self.config_file = config_file
        self.loop = asyncio.new_event_loop()
        self.kernel: Kernel | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="inferno-server", daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        if self._thread.is_alive():  # a kernel that cannot stop is a bug, never a timeout
            raise RuntimeError(f"the {self.profile} server did not stop within 60 s")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.kernel = Kernel.from_profile(self.profile, sets=self.sets,
                                          config_file=self.config_file)
        async with self.kernel.running():
            self._ready.set()
            await self._stop.wait()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the ``http`` protocol."""
        assert self.kernel is not None
        return str(self.kernel.drivers("protocols")["http"].url)

    def service(self, name: str) -> Any:
        assert self.kernel is not None
        return self.kernel.service(name)

    def run(self, coroutine: Awaitable[T], timeout: float = 60) -> T:
        """Run ``coroutine`` on the server's loop (to look inside it) and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)  # type: ignore[arg-type]
