"""The event bus: fan-out by type, isolated subscribers, bounded queues."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from inferno.kernel.events import Event, EventBus


@dataclass(frozen=True, kw_only=True)
class ModelLoaded(Event):
    TOPIC = "model.loaded"
    model: str


@dataclass(frozen=True, kw_only=True)
class ModelUnloaded(Event):
    model: str


async def test_publish_fans_out_to_subscribers_of_the_type_and_its_bases():
    bus = EventBus()
    loaded, everything = [], []
    bus.subscribe(ModelLoaded, lambda e: loaded.append(e.model))
    bus.subscribe(Event, lambda e: everything.append(e.topic))
    bus.publish(ModelLoaded(model="gemma"))
    bus.publish(ModelUnloaded(model="gemma"))
    await bus.drain()
    assert loaded == ["gemma"]
    assert everything == ["model.loaded", "ModelUnloaded"]


async def test_async_handlers_are_awaited():
    bus = EventBus()
    seen = []

    async def handler(event):
        await asyncio.sleep(0)
        seen.append(event.model)

    bus.subscribe(ModelLoaded, handler)
    bus.publish(ModelLoaded(model="a"))
    await bus.drain()
    assert seen == ["a"]


async def test_a_failing_subscriber_affects_neither_publisher_nor_others():
    bus = EventBus()
    good = []

    def broken(event):
        raise ValueError("subscriber bug")

    failing = bus.subscribe(ModelLoaded, broken)
    bus.subscribe(ModelLoaded, lambda e: good.append(e.model))
    for name in ("a", "b"):
        bus.publish(ModelLoaded(model=name))  # does not raise
    await bus.drain()
    assert good == ["a", "b"]
    assert failing.failures == 2  # and it kept receiving after the first failure


async def test_a_slow_subscriber_keeps_only_the_newest_events():
    bus = EventBus(maxsize=3)
    release = asyncio.Event()
    seen = []

    async def slow(event):
        await release.wait()
        seen.append(event.model)

    sub = bus.subscribe(ModelLoaded, slow)
    for i in range(10):
        bus.publish(ModelLoaded(model=str(i)))
        await asyncio.sleep(0)  # let the subscriber pick up the first one
    assert sub.queue.qsize() <= 3
    release.set()
    await bus.drain()
    assert seen[0] == "0"  # the one in hand when the flood began
    assert seen[-3:] == ["7", "8", "9"]  # then the newest, the oldest were dropped
    assert sub.dropped == 10 - len(seen)


async def test_publish_from_another_thread():
    bus = EventBus()
    seen = []
    bus.subscribe(ModelLoaded, lambda e: seen.append(e.model))
    thread = threading.Thread(target=bus.publish_threadsafe, args=(ModelLoaded(model="t"),))
    thread.start()
    thread.join()
    await asyncio.sleep(0)
    await bus.drain()
    assert seen == ["t"]


async def test_unsubscribe_and_close():
    bus = EventBus()
    seen = []
    sub = bus.subscribe(ModelLoaded, lambda e: seen.append(e.model))
    bus.publish(ModelLoaded(model="a"))
    await bus.drain()
    sub.cancel()
    bus.publish(ModelLoaded(model="b"))
    await bus.close()
    assert seen == ["a"]
    assert bus.stats()["subscribers"] == []


async def test_a_late_subscriber_can_replay_recent_events():
    bus = EventBus(history=2)
    for name in ("a", "b", "c"):
        bus.publish(ModelLoaded(model=name))
    seen = []
    bus.subscribe(ModelLoaded, lambda e: seen.append(e.model), replay=True)
    bus.publish(ModelLoaded(model="d"))
    await bus.drain()
    assert seen == ["b", "c", "d"]  # the remembered two, then the new one


async def test_closing_a_subscription_handles_what_is_queued_first():
    bus = EventBus()
    seen = []
    sub = bus.subscribe(ModelLoaded, lambda e: seen.append(e.model))
    for name in ("a", "b", "c"):
        bus.publish(ModelLoaded(model=name))
    await sub.close()
    bus.publish(ModelLoaded(model="late"))
    await asyncio.sleep(0)
    assert seen == ["a", "b", "c"]
