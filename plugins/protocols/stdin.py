"""(being written)"""

from __future__ import annotations

from inferno.kernel import Protocol


class StdinProtocol(Protocol):
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
