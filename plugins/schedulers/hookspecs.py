"""The hooks the scheduler offers to other plugins (added with ``inferno_add_hookspecs``).

A plugin that implements one of them adds these specs too (``add_to``), so that its
implementation is known even in a profile that enables no scheduler.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence

import pluggy

from inferno.kernel import Job, KernelHandle
from inferno.kernel.hookspecs import hookspec

#: What a plugin offers profiles to schedule: a coroutine function taking no argument.
Action = Callable[[], Awaitable[None]]


@hookspec
def inferno_scheduled_jobs(kernel: KernelHandle) -> Sequence[Job] | None:
    """Called once when the scheduler starts, after the exporters started and before the
    lifespans are entered.

    Return the jobs the plugin always runs (``Job(id, func, "interval", seconds=60)`` or
    ``Job(id, func, "cron", expression="*/5 * * * *")``). Job ids are unique across plugins;
    prefix them with the plugin's name. A job never overlaps itself.
    """


@hookspec
def inferno_scheduler_actions(kernel: KernelHandle) -> Mapping[str, Action] | None:
    """Called once when the scheduler starts, before the profile's jobs are scheduled.

    Return ``{name: coroutine function}``: work a profile may schedule by name under
    ``[schedulers.apscheduler.jobs]`` (``action = "cache.warmup"``). Names are unique across
    plugins; prefix them with the plugin's name.
    """


def add_to(plugin_manager: pluggy.PluginManager) -> None:
    """Add these specs unless they are there: the scheduler adds them, and so does every
    plugin implementing them, whichever registers first."""
    if not hasattr(plugin_manager.hook, "inferno_scheduled_jobs") or \
            plugin_manager.hook.inferno_scheduled_jobs.spec is None:
        plugin_manager.add_hookspecs(sys.modules[__name__])
