"""Lifecycle: start in order, stop in reverse, roll back a failed start, drain requests."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import pytest

from inferno.kernel import (
    Backend,
    Draining,
    Exporter,
    LifecycleError,
    PluginError,
    Protocol,
    State,
    hookimpl,
)
from inferno.kernel.events import Event, KernelStateChanged


def recorder(journal: list[str], kind: type, fail_on_start: bool = False) -> type:
    """A driver class of ``kind`` that writes its start and stop into ``journal``."""

    class Recording(kind):  # type: ignore[misc, valid-type]
        async def start(self) -> None:
            journal.append(f"start {self.name}")
            if fail_on_start:
                raise RuntimeError("port 8080 is taken")

        async def stop(self) -> None:
            journal.append(f"stop {self.name}")

        async def load(self, spec):  # Backend's abstract method
            raise NotImplementedError

    Recording.__abstractmethods__ = frozenset()
    return Recording


async def test_drivers_start_in_kind_order_and_stop_in_reverse(make_kernel):
    journal: list[str] = []
    kernel = make_kernel(
        {"protocols": {"front": {}}, "exporters": {"metrics": {}}, "backends": {"engine": {}}},
        plugins={"front": recorder(journal, Protocol), "metrics": recorder(journal, Exporter),
                 "engine": recorder(journal, Backend)})
    async with kernel.running():
        assert kernel.state == State.RUNNING
        assert journal == ["start engine", "start metrics", "start front"]
    assert journal[3:] == ["stop front", "stop metrics", "stop engine"]
    assert kernel.state == State.STOPPED


async def test_failed_start_stops_only_what_started_and_names_the_plugin(make_kernel):
    journal: list[str] = []
    kernel = make_kernel(
        {"protocols": {"front": {}}, "exporters": {"metrics": {}}, "backends": {"engine": {}}},
        plugins={"front": recorder(journal, Protocol, fail_on_start=True),
                 "metrics": recorder(journal, Exporter), "engine": recorder(journal, Backend)})
    with pytest.raises(PluginError) as caught:
        await kernel.start()
    assert caught.value.plugin == "front"
    assert "port 8080 is taken" in str(caught.value)
    assert journal == ["start engine", "start metrics", "start front",
                       "stop metrics", "stop engine"]
    assert kernel.state == State.STOPPED


async def test_lifespan_contexts_enter_before_protocols_and_exit_after(make_kernel):
    journal: list[str] = []

    class Background:
        @staticmethod
        @hookimpl
        def inferno_lifespan(kernel):
            @asynccontextmanager
            async def span():
                journal.append("enter lifespan")
                yield
                journal.append("exit lifespan")
            return span()

    kernel = make_kernel({"protocols": {"front": {}}},
                         plugins={"front": recorder(journal, Protocol), "bg": Background})
    async with kernel.running():
        pass
    assert journal == ["enter lifespan", "start front", "stop front", "exit lifespan"]


async def test_ready_and_stopping_hooks_are_called(make_kernel):
    calls: list[str] = []

    class Watcher:
        @staticmethod
        def inferno_kernel_ready(kernel):
            calls.append(f"ready {kernel.state}")

        @staticmethod
        def inferno_kernel_stopping(kernel, reason):
            calls.append(f"stopping {reason}")

    kernel = make_kernel(plugins={"watcher": Watcher})
    async with kernel.running():
        pass
    assert calls == ["ready running", "stopping requested"]


async def test_state_changes_are_published_on_the_bus(make_kernel):
    kernel = make_kernel()
    seen: list[str] = []
    kernel.bus.subscribe(KernelStateChanged, lambda e: seen.append(e.state))
    await kernel.start()
    await kernel.bus.drain()
    assert seen == ["starting", "running"]
    await kernel.stop()
    assert kernel.state == "stopped"


async def test_stop_refuses_new_requests_and_waits_for_inflight_ones(make_kernel):
    kernel = make_kernel()
    await kernel.start()
    finished = asyncio.Event()
    entered = asyncio.Event()

    async def request():
        async with kernel.admit():
            entered.set()
            await asyncio.sleep(0.2)
            finished.set()

    task = asyncio.create_task(request())
    await entered.wait()
    stopping = asyncio.create_task(kernel.stop())
    await asyncio.sleep(0)
    with pytest.raises(Draining, match="stopping"):
        async with kernel.admit():
            pass
    await stopping
    assert finished.is_set()  # stop waited for the in-flight request
    await task


async def test_drain_gives_up_after_the_timeout(make_kernel, capsys):
    from inferno.kernel.logs import configure_logging
    configure_logging("json", "info")
    kernel = make_kernel({"kernel": {"drain_timeout": 0.2}})
    await kernel.start()
    never, entered = asyncio.Event(), asyncio.Event()

    async def stuck():
        async with kernel.admit():
            entered.set()
            await never.wait()

    task = asyncio.create_task(stuck())
    await entered.wait()
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(kernel.stop(), 5)
    waited = asyncio.get_running_loop().time() - started
    assert kernel.state == "stopped"
    assert 0.2 <= waited < 2  # it waited for the drain, then gave up
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert {"event": "drain timed out", "abandoned": 1}.items() <= \
        next(e for e in logged if e["event"] == "drain timed out").items()
    task.cancel()


async def test_a_plugin_that_fails_to_stop_does_not_keep_others_running(make_kernel):
    journal: list[str] = []

    class Stubborn(Exporter):
        async def stop(self):
            raise RuntimeError("cannot flush")

    kernel = make_kernel({"exporters": {"stubborn": {}}, "backends": {"engine": {}}},
                         plugins={"stubborn": Stubborn, "engine": recorder(journal, Backend)})
    async with kernel.running():
        pass
    assert journal == ["start engine", "stop engine"]


async def test_configuration_is_frozen_and_states_are_enforced(make_kernel):
    kernel = make_kernel()
    with pytest.raises(TypeError):
        kernel.config["kernel"]["drain_timeout"] = 1  # type: ignore[index]
    with pytest.raises(LifecycleError, match="the kernel is configured"):
        kernel.configure()


async def test_requests_are_refused_before_start(make_kernel):
    kernel = make_kernel()
    with pytest.raises(Draining, match="configured"):
        async with kernel.admit():
            pass


async def test_drivers_get_their_own_data_dir(make_kernel, inferno_data_dir):
    kernel = make_kernel({"exporters": {"log": {}}})
    async with kernel.running():
        driver = kernel.drivers("exporters")["log"]
        assert driver.context.data_dir == inferno_data_dir / "exporters" / "log"
        assert driver.context.data_dir.is_dir()


async def test_log_exporter_writes_kernel_events(make_kernel, capsys):
    from inferno.kernel.logs import configure_logging
    configure_logging("json", "debug")
    kernel = make_kernel({"exporters": {"log": {"topics": ["kernel.state"]}}})
    async with kernel.running():
        await kernel.bus.drain()
    err = capsys.readouterr().err
    assert '"topic": "kernel.state"' in err
    assert '"state": "running"' in err
    assert '"topic": "plugin.started"' not in err  # filtered out by topics


def test_event_base_topic_defaults_to_class_name():
    class Custom(Event):
        pass

    assert Custom().topic == "Custom"


async def test_a_failing_ready_hook_stops_everything_that_started(make_kernel):
    journal: list[str] = []

    class Broken:
        @staticmethod
        def inferno_kernel_ready(kernel):
            raise RuntimeError("ready hook bug")

    kernel = make_kernel({"backends": {"engine": {}}},
                         plugins={"engine": recorder(journal, Backend), "broken": Broken})
    with pytest.raises(PluginError, match="ready hook bug"):
        await kernel.start()
    assert journal == ["start engine", "stop engine"]
    assert kernel.state == State.STOPPED


async def test_a_failing_stopping_hook_does_not_prevent_shutdown(make_kernel):
    journal: list[str] = []

    class Broken:
        @staticmethod
        def inferno_kernel_stopping(kernel, reason):
            raise RuntimeError("stopping hook bug")

    kernel = make_kernel({"backends": {"engine": {}}},
                         plugins={"engine": recorder(journal, Backend), "broken": Broken})
    async with kernel.running():
        pass
    assert journal == ["start engine", "stop engine"]


async def test_a_failing_lifespan_is_reported_with_its_plugin_name(make_kernel):
    class Background:
        @staticmethod
        def inferno_lifespan(kernel):
            @asynccontextmanager
            async def span():
                raise OSError("cannot open socket")
                yield
            return span()

    kernel = make_kernel(plugins={"background": Background})
    with pytest.raises(PluginError) as caught:
        await kernel.start()
    assert caught.value.plugin == "background"


async def test_subscribers_see_events_published_just_before_shutdown(make_kernel):
    seen: list[str] = []

    class Watcher:
        @staticmethod
        def inferno_lifespan(kernel):
            @asynccontextmanager
            async def span():
                subscription = kernel.bus.subscribe(KernelStateChanged,
                                                    lambda e: seen.append(e.state))
                yield
                subscription.cancel()
            return span()

    kernel = make_kernel(plugins={"watcher": Watcher})
    async with kernel.running():
        pass
    assert seen == ["running", "stopping"]


async def test_a_command_can_start_everything_but_the_protocols(make_kernel):
    journal: list[str] = []
    kernel = make_kernel(
        {"protocols": {"front": {}}, "backends": {"engine": {}}},
        plugins={"front": recorder(journal, Protocol), "engine": recorder(journal, Backend)})
    async with kernel.running(protocols=False):
        assert journal == ["start engine"]
        assert kernel.state == State.RUNNING
        async with kernel.admit():  # in-process work is still admitted
            pass
    assert journal == ["start engine", "stop engine"]


async def test_services_are_offered_by_name_until_the_kernel_stops(make_kernel):
    kernel = make_kernel()
    registry = object()
    async with kernel.running():
        kernel.provide("jobs", registry)
        kernel.provide("jobs", registry)  # offering the same object again is harmless
        assert kernel.service("jobs") is registry
        with pytest.raises(LifecycleError, match="'jobs' is already provided"):
            kernel.provide("jobs", object())
        with pytest.raises(LookupError,
                           match=r"no service named 'tea' \(offered: .*gateway, jobs, "):
            kernel.service("tea")
    with pytest.raises(LookupError, match="offered: none"):
        kernel.service("jobs")


async def test_a_protocol_whose_input_ended_stops_a_serving_kernel(make_kernel):
    """``kernel.shutdown`` ends ``serve`` as SIGTERM would: drained, stopped, exit code 0."""
    finished: list[str] = []

    class OneShot(Protocol):
        async def start(self) -> None:
            self.task = asyncio.create_task(self.work())

        async def work(self) -> None:
            async with self.context.kernel.admit():
                await asyncio.sleep(0.05)
                finished.append("request")
            self.context.kernel.shutdown("end of input")

        async def stop(self) -> None:
            await self.task

    kernel = make_kernel({"protocols": {"oneshot": {}}}, plugins={"oneshot": OneShot})
    code = await asyncio.wait_for(kernel.serve(), 10)
    assert (code, finished, kernel.state) == (0, ["request"], State.STOPPED)
