"""The ``apscheduler`` scheduler in a running kernel: jobs from plugins and from the profile
run repeatedly, never overlap themselves, fail without stopping the others, are counted,
and stop with the kernel."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from inferno.kernel import ConfigError, Job, Kernel, PluginError, hookimpl
from inferno.plugins.schedulers.apscheduler import ApScheduler, SchedulerError

#: Generous: a loaded CI machine may be slow, but a working scheduler never comes near it.
PATIENCE = 20.0


def scheduler_profile(**settings: Any) -> dict[str, Any]:
    return {"schedulers": {"apscheduler": settings}}


def job_plugin(*jobs: Job, actions: dict[str, Callable[[], Awaitable[None]]] | None = None
               ) -> type:
    """A hook plugin that schedules ``jobs`` and offers ``actions`` to the profile."""

    @hookimpl
    def inferno_scheduled_jobs(kernel: Any) -> list[Job]:
        return list(jobs)

    @hookimpl
    def inferno_scheduler_actions(kernel: Any) -> dict[str, Any]:
        return dict(actions or {})

    return type("JobPlugin", (), {
        "inferno_scheduled_jobs": staticmethod(inferno_scheduled_jobs),
        "inferno_scheduler_actions": staticmethod(inferno_scheduler_actions)})


def scheduler_of(kernel: Kernel) -> ApScheduler:
    scheduler = kernel.service("scheduler")
    assert isinstance(scheduler, ApScheduler)
    return scheduler


class Counter:
    """A job that counts its runs and wakes the test once it has run ``wanted`` times."""

    def __init__(self, wanted: int = 3) -> None:
        self.runs = 0
        self.wanted = wanted
        self.done = asyncio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        if self.runs >= self.wanted:
            self.done.set()


# --------------------------------------------------------------------------- running jobs


async def test_an_interval_job_from_a_plugin_runs_repeatedly_and_is_counted(make_kernel):
    tick = Counter(wanted=3)
    kernel = make_kernel(scheduler_profile(), plugins={
        "ticker": job_plugin(Job("ticker.tick", tick, "interval", seconds=0.1))})
    async with kernel.running():
        await asyncio.wait_for(tick.done.wait(), PATIENCE)
        scheduler = scheduler_of(kernel)
        assert scheduler.jobs() == ["ticker.tick"]
        assert scheduler.stats()["ticker.tick"]["runs"] >= 3
    assert kernel.drivers("schedulers") == {}


async def test_a_slow_job_never_overlaps_itself(make_kernel):
    running, most = 0, 0
    finished = Counter(wanted=3)

    async def slow() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.35)  # the work itself: three intervals long
        running -= 1
        await finished()

    kernel = make_kernel(scheduler_profile(), plugins={
        "slow": job_plugin(Job("slow.work", slow, "interval", seconds=0.1))})
    async with kernel.running():
        await asyncio.wait_for(finished.done.wait(), PATIENCE)
        stats = scheduler_of(kernel).stats()["slow.work"]
    assert most == 1
    assert stats["skipped"] >= 1


async def test_a_failing_job_is_logged_and_counted_and_the_others_go_on(make_kernel):
    failures = Counter(wanted=2)
    other = Counter(wanted=3)

    async def broken() -> None:
        await failures()
        raise RuntimeError("disk on fire")

    kernel = make_kernel(scheduler_profile(), plugins={"jobs": job_plugin(
        Job("jobs.broken", broken, "interval", seconds=0.1),
        Job("jobs.fine", other, "interval", seconds=0.1))})
    with capture_logs() as logs:
        async with kernel.running():
            await asyncio.wait_for(failures.done.wait(), PATIENCE)
            await asyncio.wait_for(other.done.wait(), PATIENCE)
            stats = scheduler_of(kernel).stats()["jobs.broken"]
    assert stats["failures"] >= 2
    assert stats["last_error"] == "RuntimeError: disk on fire"
    failed = [e for e in logs if e["event"] == "job failed"]
    assert len(failed) >= 2
    assert failed[0]["job"] == "jobs.broken"
    assert failed[0]["error"] == "RuntimeError: disk on fire"
    assert isinstance(failed[0]["seconds"], float)


async def test_jobs_are_added_and_removed_through_the_scheduler_service(make_kernel):
    tick = Counter(wanted=2)
    kernel = make_kernel(scheduler_profile())
    async with kernel.running():
        scheduler = scheduler_of(kernel)
        assert kernel.drivers("schedulers")["apscheduler"] is scheduler
        scheduler.add_job(Job("later.tick", tick, "interval", seconds=0.1))
        with pytest.raises(SchedulerError, match="already scheduled"):
            scheduler.add_job(Job("later.tick", tick, "interval", seconds=0.1))
        with pytest.raises(SchedulerError, match="invalid cron expression"):
            scheduler.add_job(Job("later.cron", tick, "cron", expression="every monday"))
        await asyncio.wait_for(tick.done.wait(), PATIENCE)
        scheduler.remove_job("later.tick")
        assert scheduler.jobs() == []
        with pytest.raises(LookupError, match=r"later\.tick"):
            scheduler.remove_job("later.tick")


# --------------------------------------------------------------------------- the profile's jobs


async def test_the_profile_schedules_an_action_a_plugin_offers(make_kernel):
    warm = Counter(wanted=2)
    kernel = make_kernel(scheduler_profile(jobs={
        "warm_cache": {"action": "cache.warm", "trigger": "interval", "seconds": 0.1},
        "nightly": {"action": "cache.warm", "trigger": "cron", "cron": "0 3 * * *"},
    }), plugins={"warmer": job_plugin(actions={"cache.warm": warm})})
    async with kernel.running():
        await asyncio.wait_for(warm.done.wait(), PATIENCE)
        assert scheduler_of(kernel).jobs() == ["nightly", "warm_cache"]


async def test_a_job_naming_an_action_no_plugin_offers_stops_the_start(make_kernel):
    kernel = make_kernel(scheduler_profile(jobs={
        "warm_cache": {"action": "cache.wram", "seconds": 60}}),
        plugins={"warmer": job_plugin(actions={"cache.warm": Counter()})})
    with pytest.raises(PluginError, match=r"jobs\.warm_cache\.action: no plugin offers the "
                                          r"action 'cache.wram' \(offered: [^)]*cache.warm\b"):
        await kernel.start()


def test_a_wrong_time_zone_is_reported_with_its_key(make_kernel):
    with pytest.raises(ConfigError) as caught:
        make_kernel(scheduler_profile(timezone="Mars/Olympus"))
    problems = {p.key: p.message for p in caught.value.problems}
    assert "unknown time zone 'Mars/Olympus'" in problems["schedulers.apscheduler.timezone"]


def test_a_wrong_cron_expression_and_every_other_wrong_job_is_reported_with_its_key(make_kernel):
    with pytest.raises(ConfigError) as caught:
        make_kernel(scheduler_profile(jobs={
            "nightly": {"action": "x", "trigger": "cron", "cron": "61 * * * *"},
            "often": {"action": "x", "trigger": "interval", "seconds": 0},
            "odd": {"action": "", "trigger": "hourly", "sconds": 5},
        }))
    problems = {p.key: p.message for p in caught.value.problems}
    assert "invalid cron expression '61 * * * *'" in \
        problems["schedulers.apscheduler.jobs.nightly.cron"]
    assert "seconds > 0" in problems["schedulers.apscheduler.jobs.often.seconds"]
    assert "must be one of: interval, cron" in problems["schedulers.apscheduler.jobs.odd.trigger"]
    assert "unknown key" in problems["schedulers.apscheduler.jobs.odd.sconds"]
    assert "must name an action" in problems["schedulers.apscheduler.jobs.odd.action"]


# --------------------------------------------------------------------------- shutdown


async def test_stop_waits_for_a_running_job_to_finish(make_kernel):
    started, finished = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.set()

    kernel = make_kernel(scheduler_profile(stop_wait=PATIENCE), plugins={
        "work": job_plugin(Job("work.run", work, "interval", seconds=0.1))})
    await kernel.start()
    await asyncio.wait_for(started.wait(), PATIENCE)
    await kernel.stop()
    assert finished.is_set()


async def test_stop_cancels_a_job_still_running_after_stop_wait(make_kernel):
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hangs() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    kernel = make_kernel(scheduler_profile(stop_wait=0.2), plugins={
        "hangs": job_plugin(Job("hangs.forever", hangs, "interval", seconds=0.1))})
    with capture_logs() as logs:
        await kernel.start()
        await asyncio.wait_for(started.wait(), PATIENCE)
        await kernel.stop()
    assert cancelled.is_set()
    warning = next(e for e in logs if e["event"] == "cancelling jobs still running after "
                                                    "stop_wait")
    assert warning["jobs"] == ["hangs.forever"]
    assert kernel.state == "stopped"
