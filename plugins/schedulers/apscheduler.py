"""The ``apscheduler`` scheduler: periodic work on APScheduler 3's ``AsyncIOScheduler``.

Jobs come from three places: plugins return fixed ones from ``inferno_scheduled_jobs``,
the profile schedules the actions plugins offer through ``inferno_scheduler_actions``
(``[schedulers.apscheduler.jobs]``), and running plugins call ``add_job`` on the
``scheduler`` service (alert evaluation does). A job never overlaps itself
(``max_instances`` is always 1); every run, failure, skip and miss is logged and counted
in ``stats()``. docs/scheduler.md has the configuration and the guarantees.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import pluggy
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from dynaconf import Validator

from inferno.kernel import ConfigError, ConfigProblem, ConfigSpec, Job, Scheduler, hookimpl

from . import hookspecs
from .triggers import job_problems, make_trigger, timezone

SECTION = "schedulers.apscheduler"
SERVICE = "scheduler"

DEFAULTS: dict[str, Any] = {
    # Runs missed while the process was busy are run once, not once per missed time.
    "coalesce": True,
    # Seconds late a run may still start; later than that it is counted as missed.
    "misfire_grace_time": 30.0,
    # Zone cron expressions are read in ("UTC", or an IANA name like "Europe/Paris").
    "timezone": "UTC",
    # Seconds stop() waits for running jobs before cancelling them (keep it below
    # kernel.stop_timeout).
    "stop_wait": 5.0,
    # Jobs the profile schedules: name → { action = "<an action a plugin offers>",
    # trigger = "interval" | "cron", seconds = N | cron = "*/5 * * * *" }.
    "jobs": {},
}


class SchedulerError(RuntimeError):
    """A job that cannot be scheduled: the message says which and why."""


@dataclasses.dataclass
class JobStats:
    """What one job did since the scheduler started (``stats()`` hands these out)."""

    #: Runs that finished, failed ones included.
    runs: int = 0
    failures: int = 0
    #: Times it came due while still running (never overlapping itself) or too late.
    skipped: int = 0
    #: Wall-clock time (``time.time()``) the last run started; ``None`` before the first.
    last_run: float | None = None
    last_seconds: float | None = None
    last_error: str | None = None


class ApScheduler(Scheduler):
    """Interval and cron jobs in the kernel's event loop, one instance of each at a time."""

    @staticmethod
    @hookimpl
    def inferno_add_hookspecs(plugin_manager: pluggy.PluginManager) -> None:
        hookspecs.add_to(plugin_manager)

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(defaults=DEFAULTS, validators=[
            Validator("coalesce", is_type_of=bool),
            Validator("misfire_grace_time", "stop_wait", is_type_of=(int, float), gt=0),
            Validator("timezone", is_type_of=str),
        ])

    @staticmethod
    @hookimpl
    def inferno_configure(config: Mapping[str, Any]) -> None:
        problems = []
        try:
            zone = timezone(config["timezone"])
        except ValueError as exc:
            zone = None
            problems.append(ConfigProblem(f"{SECTION}.timezone", str(exc)))
        problems += job_problems(f"{SECTION}.jobs", config["jobs"], zone)
        if problems:
            raise ConfigError(problems)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._scheduler: AsyncIOScheduler | None = None
        self._stats: dict[str, JobStats] = {}
        #: Runs under way (the executor's tasks) and their job ids, waited for in ``stop``.
        self._running: dict[asyncio.Task[Any], str] = {}

    # ----------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.zone = timezone(self.config["timezone"])
        # The driver logs every run, skip and miss itself (with the job id and seconds);
        # APScheduler's own per-run lines would say the same again, without them.
        quiet = logging.getLogger("apscheduler")
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.ERROR)
        self._scheduler = AsyncIOScheduler(timezone=self.zone, job_defaults={
            "coalesce": bool(self.config["coalesce"]),
            "misfire_grace_time": float(self.config["misfire_grace_time"]),
            "max_instances": 1,
        })
        self._scheduler.add_listener(self._not_run, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        kernel = self.context.kernel
        try:
            for jobs in kernel.hook.inferno_scheduled_jobs(kernel=kernel):
                for job in jobs or ():
                    self.add_job(job)
            self._schedule_profile_jobs(self._actions())
        except BaseException:
            self._scheduler = None
            raise
        self._scheduler.start()
        kernel.provide(SERVICE, self)
        self.log.info("scheduler started", jobs=self.jobs(), timezone=str(self.zone))

    async def stop(self) -> None:
        """No new runs; running jobs get ``stop_wait`` seconds to finish, then are cancelled."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is None:
            return
        scheduler.pause()
        wait = float(self.config["stop_wait"])
        pending: set[asyncio.Task[Any]] = set()
        if self._running:
            self.log.info("waiting for running jobs", jobs=sorted(self._running.values()),
                          timeout=wait)
            _, pending = await asyncio.wait(set(self._running), timeout=wait)
        if pending:
            self.log.warning("cancelling jobs still running after stop_wait",
                             jobs=sorted(self._running[t] for t in pending), stop_wait=wait)
        scheduler.shutdown(wait=False)  # cancels the runs still pending
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    # ----------------------------------------------------------------------- the contract

    def add_job(self, job: Job) -> None:
        """Schedule ``job``; ``SchedulerError`` for a taken id or a trigger that is wrong."""
        if self._scheduler is None:
            raise SchedulerError(f"cannot add job {job.id!r}: the scheduler is not running")
        if self._scheduler.get_job(job.id) is not None:
            raise SchedulerError(f"a job with id {job.id!r} is already scheduled")
        try:
            trigger = make_trigger(job.trigger, job.seconds, job.expression, self.zone)
        except ValueError as exc:
            raise SchedulerError(f"job {job.id!r}: {exc}") from exc
        self._stats.setdefault(job.id, JobStats())
        self._scheduler.add_job(self._run, trigger, args=(job.id, job.func), id=job.id,
                                name=job.id)
        self.log.debug("job scheduled", job=job.id, trigger=str(trigger))

    def remove_job(self, job_id: str) -> None:
        """Unschedule ``job_id`` (a run under way finishes); ``LookupError`` if unknown."""
        if self._scheduler is None or self._scheduler.get_job(job_id) is None:
            raise LookupError(f"no job with id {job_id!r} (scheduled: "
                              f"{', '.join(self.jobs()) or 'none'})")
        self._scheduler.remove_job(job_id)
        self.log.debug("job removed", job=job_id)

    def jobs(self) -> Sequence[str]:
        if self._scheduler is None:
            return []
        return sorted(job.id for job in self._scheduler.get_jobs())

    def stats(self) -> Mapping[str, Mapping[str, Any]]:
        """``{job id: {runs, failures, skipped, last_run, last_seconds, last_error}}``, for
        ``inferno`` commands and for exporters to publish."""
        return {job_id: dataclasses.asdict(stats) for job_id, stats in self._stats.items()}

    # ----------------------------------------------------------------------- internals

    async def _run(self, job_id: str, func: Callable[[], Awaitable[None]]) -> None:
        """One run of a job: timed, logged and counted; a failure never stops the others."""
        task = asyncio.current_task()
        if task is not None:
            self._running[task] = job_id
        stats = self._stats.setdefault(job_id, JobStats())
        stats.last_run = time.time()
        started = time.perf_counter()
        try:
            await func()
        except asyncio.CancelledError:
            self.log.warning("job cancelled", job=job_id,
                             seconds=round(time.perf_counter() - started, 3))
            raise
        except Exception as exc:
            stats.failures += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            self.log.error("job failed", job=job_id, error=stats.last_error, exc_info=True,
                           seconds=round(time.perf_counter() - started, 3))
        else:
            self.log.debug("job ran", job=job_id,
                           seconds=round(time.perf_counter() - started, 3))
        finally:
            stats.runs += 1
            stats.last_seconds = time.perf_counter() - started
            if task is not None:
                self._running.pop(task, None)

    def _not_run(self, event: JobEvent) -> None:
        """A run that came due while the job still ran, or too late to start."""
        self._stats.setdefault(event.job_id, JobStats()).skipped += 1
        why = "still running" if event.code == EVENT_JOB_MAX_INSTANCES else "missed"
        self.log.info("job run skipped", job=event.job_id, reason=why)

    def _actions(self) -> dict[str, Callable[[], Awaitable[None]]]:
        kernel = self.context.kernel
        actions: dict[str, Callable[[], Awaitable[None]]] = {}
        for offered in kernel.hook.inferno_scheduler_actions(kernel=kernel):
            for name, action in (offered or {}).items():
                if name in actions:
                    raise SchedulerError(f"two plugins offer the scheduler action {name!r}")
                actions[name] = action
        return actions

    def _schedule_profile_jobs(self, actions: Mapping[str, Callable[[], Awaitable[None]]]
                               ) -> None:
        for name, spec in self.config["jobs"].items():
            action = actions.get(spec["action"])
            if action is None:
                offered = ", ".join(sorted(actions)) or "none"
                raise SchedulerError(
                    f"{SECTION}.jobs.{name}.action: no plugin offers the action "
                    f"{spec['action']!r} (offered: {offered})")
            kind = spec.get("trigger", "interval")
            self.add_job(Job(id=name, func=action, trigger=kind, seconds=spec.get("seconds"),
                             expression=spec.get("cron")))
