"""The kernel's event bus: typed events, subscription by type, bounded queues.

``publish`` never blocks and never fails because of a subscriber. Each
subscriber has its own queue of ``maxsize`` events and its own task; when a
slow subscriber's queue is full the *oldest* queued event is dropped to make
room for the new one (the subscriber sees the latest state, memory stays
bounded) and the subscriber's ``dropped`` count goes up. A subscriber that
raises is logged and keeps receiving later events.

The bus also keeps the last ``history`` events, so a subscriber that starts
late (an exporter starts after the backends) can ask for them with
``replay=True``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

E = TypeVar("E", bound="Event")
Handler = Callable[[Any], Awaitable[None] | None]


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event. Subscribing to ``Event`` receives all of them."""

    time: float = field(default_factory=time.time)

    @property
    def topic(self) -> str:
        """A stable dotted name for relays (``kernel.ready``, ``model.loaded``)."""
        return getattr(self, "TOPIC", type(self).__name__)


@dataclass(frozen=True, kw_only=True)
class KernelStateChanged(Event):
    TOPIC = "kernel.state"
    state: str
    previous: str


@dataclass(frozen=True, kw_only=True)
class PluginStarted(Event):
    TOPIC = "plugin.started"
    plugin: str
    kind: str


@dataclass(frozen=True, kw_only=True)
class PluginStopped(Event):
    TOPIC = "plugin.stopped"
    plugin: str
    kind: str
    error: str | None = None


class Subscription:
    """One subscriber: a queue and the task that drains it into the handler."""

    def __init__(self, bus: EventBus, event_type: type[Event], handler: Handler,
                 maxsize: int) -> None:
        self.bus = bus
        self.event_type = event_type
        self.handler = handler
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0
        self.failures = 0
        self.task: asyncio.Task[None] | None = None

    def offer(self, event: Event) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.queue.task_done()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def run(self) -> None:
        while True:
            event = await self.queue.get()
            try:
                result = self.handler(event)
                if result is not None:
                    await result
            except Exception:
                self.failures += 1
                self.bus.log.exception("event subscriber failed", topic=event.topic,
                                       subscriber=_name(self.handler))
            finally:
                self.queue.task_done()

    def cancel(self) -> None:
        """Stop at once; events still queued are dropped."""
        self.bus.unsubscribe(self)

    async def close(self, timeout: float = 5.0) -> None:
        """Handle what is already queued (up to ``timeout``), then stop."""
        try:
            await asyncio.wait_for(self.queue.join(), timeout)
        except TimeoutError:
            self.bus.log.warning("subscriber closed with events still queued",
                                 subscriber=_name(self.handler), queued=self.queue.qsize())
        self.cancel()


class EventBus:
    """Publish typed events to every subscriber of their type or a base type."""

    def __init__(self, maxsize: int = 1000,
                 log: structlog.typing.FilteringBoundLogger | None = None,
                 history: int = 100) -> None:
        self.maxsize = maxsize
        self.log = log or structlog.get_logger("inferno.bus")
        self._subscriptions: list[Subscription] = []
        self._history: deque[Event] = deque(maxlen=history)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.published = 0

    def subscribe(self, event_type: type[E], handler: Callable[[E], Awaitable[None] | None],
                  *, maxsize: int | None = None, replay: bool = False) -> Subscription:
        """Call ``handler`` for every event of ``event_type`` (or a subclass).

        Must be called from a running event loop. ``handler`` may be sync or async.
        With ``replay`` the handler first receives the matching events the bus
        still remembers (the last ``history``), oldest first.
        """
        self._loop = asyncio.get_running_loop()
        subscription = Subscription(self, event_type, handler, maxsize or self.maxsize)
        if replay:
            for event in self._history:
                if isinstance(event, event_type):
                    subscription.offer(event)
        subscription.task = self._loop.create_task(subscription.run(),
                                                   name=f"bus:{_name(handler)}")
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
        if subscription.task is not None:
            subscription.task.cancel()

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every matching subscriber; returns at once."""
        self.published += 1
        self._history.append(event)
        for subscription in list(self._subscriptions):
            if isinstance(event, subscription.event_type):
                subscription.offer(event)

    def publish_threadsafe(self, event: Event) -> None:
        """``publish`` from a thread other than the event loop's (a backend's worker)."""
        if self._loop is None:
            self.published += 1
            return
        self._loop.call_soon_threadsafe(self.publish, event)

    async def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event was handled; ``False`` on timeout."""
        waits = [sub.queue.join() for sub in self._subscriptions]
        if not waits:
            return True
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop every subscriber."""
        await self.drain(timeout)
        tasks = [sub.task for sub in self._subscriptions if sub.task is not None]
        for subscription in list(self._subscriptions):
            self.unsubscribe(subscription)
        await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "subscribers": [
                {"handler": _name(s.handler), "queued": s.queue.qsize(), "dropped": s.dropped,
                 "failures": s.failures}
                for s in self._subscriptions
            ],
        }


def _name(handler: Callable[..., Any]) -> str:
    return getattr(handler, "__qualname__", repr(handler))
