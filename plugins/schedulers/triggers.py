"""Triggers and the profile's job table, checked before anything starts.

One function builds a trigger for a profile job and for a plugin's ``Job`` alike, so a
cron expression means the same wherever it was written, and a wrong one is reported with
the key (or the job id) it came from.
"""

from __future__ import annotations

import datetime
import zoneinfo
from collections.abc import Mapping
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from inferno.kernel import ConfigProblem

TRIGGERS = ("interval", "cron")
JOB_KEYS = ("action", "trigger", "seconds", "cron")


def timezone(name: str) -> datetime.tzinfo:
    """The zone ``name`` (``"UTC"``, ``"Europe/Paris"``); ``ValueError`` when unknown."""
    if name.upper() == "UTC":
        return datetime.UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (an IANA name like "
                         f"\"Europe/Paris\", or \"UTC\")") from exc


def make_trigger(kind: str, seconds: float | None, expression: str | None,
                 zone: datetime.tzinfo) -> BaseTrigger:
    """An APScheduler trigger; ``ValueError`` saying what is wrong with the arguments."""
    if kind == "interval":
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            raise ValueError(f"an interval trigger needs seconds > 0, got {seconds!r}")
        return IntervalTrigger(seconds=float(seconds), timezone=zone)
    if kind == "cron":
        if not isinstance(expression, str) or not expression.strip():
            raise ValueError("a cron trigger needs an expression like \"*/5 * * * *\"")
        try:
            return CronTrigger.from_crontab(expression, timezone=zone)
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {expression!r}: {exc} (five fields: "
                             f"minute hour day month day_of_week)") from exc
    raise ValueError(f"unknown trigger {kind!r}; choose one of: {', '.join(TRIGGERS)}")


def job_problems(path: str, jobs: Any, zone: datetime.tzinfo | None) -> list[ConfigProblem]:
    """Every problem in the profile's ``jobs`` table (``path`` is where it lives)."""
    if not isinstance(jobs, Mapping):
        return [ConfigProblem(path, "must be a table of jobs: name → { action, trigger, "
                                    "seconds | cron }")]
    problems = []
    for name, job in jobs.items():
        where = f"{path}.{name}"
        if not isinstance(job, Mapping):
            problems.append(ConfigProblem(where, "must be a table { action, trigger, "
                                                 "seconds | cron }"))
            continue
        problems += [ConfigProblem(f"{where}.{key}", f"unknown key; a job has "
                                                     f"{', '.join(JOB_KEYS)}")
                     for key in job if key not in JOB_KEYS]
        action = job.get("action")
        if not isinstance(action, str) or not action:
            problems.append(ConfigProblem(f"{where}.action", "must name an action a plugin "
                                                             "offers (a non-empty string)"))
        kind = job.get("trigger", "interval")
        if kind not in TRIGGERS:
            problems.append(ConfigProblem(f"{where}.trigger", f"must be one of: "
                                                              f"{', '.join(TRIGGERS)}; got "
                                                              f"{kind!r}"))
            continue
        key = "seconds" if kind == "interval" else "cron"
        if zone is None:
            continue  # the time zone is wrong and reported; a trigger cannot be built
        try:
            make_trigger(kind, job.get("seconds"), job.get("cron"), zone)
        except ValueError as exc:
            problems.append(ConfigProblem(f"{where}.{key}", str(exc)))
    return problems
