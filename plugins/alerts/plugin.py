"""The ``alerts`` hook plugin: rules over the metrics, evaluated on the scheduler, sent by
notifiers.

It owns the top-level ``[alerts]`` section. When enabled, its lifespan reads the metrics
registry (the ``metrics`` service), builds the notifiers (built-in kinds and those plugins
add through ``inferno_alert_notifiers``) and schedules the evaluation every ``interval``
seconds on the ``scheduler`` service. docs/alerts.md has the rules, the state machine and
the webhook payload.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pluggy
from dynaconf import Validator

from inferno.kernel import ConfigError, ConfigProblem, ConfigSpec, Job, KernelHandle, hookimpl
from inferno.kernel.logs import get_logger

from . import hookspecs
from .engine import AlertEngine
from .notifiers import BUILT_IN, Dispatcher, Notifier, NotifierFactory, notifier_problems
from .rules import Rule, rule_problems

SECTION = "alerts"
#: The engine is offered under this name, to look inside a running server.
SERVICE = "alerts"
JOB_ID = "alerts.evaluate"
#: Seconds queued notifications may still take to go out at shutdown.
SEND_WAIT = 5.0

DEFAULTS: dict[str, Any] = {
    # Evaluate the rules at all (needs [schedulers.apscheduler] and the metrics exporter).
    "enabled": False,
    # Seconds between two evaluations of every rule.
    "interval": 15.0,
    # name → { kind = "gauge" | "increase" | "ratio" | "quantile", metric, threshold,
    # op, for, window, quantile, match, numerator, aggregate, severity, labels, summary }.
    "rules": {},
    # name → { kind = "webhook" | "log" | a kind a plugin adds, ... }; none: the log.
    "notifiers": {},
}

log = get_logger(SECTION)


class AlertsError(RuntimeError):
    """Alerting cannot start: the message says what is missing and what to set."""


@hookimpl
def inferno_add_hookspecs(plugin_manager: pluggy.PluginManager) -> None:
    hookspecs.add_to(plugin_manager)


@hookimpl
def inferno_config_spec() -> ConfigSpec:
    # Webhook URLs and headers may hold tokens: declared secret, with patterns
    # the kernel's masking matches per notifier.
    return ConfigSpec(section=SECTION, defaults=DEFAULTS,
                      secrets=frozenset({"notifiers.*.url", "notifiers.*.headers"}),
                      validators=[
        Validator("enabled", is_type_of=bool),
    ])


@hookimpl
def inferno_configure(config: Mapping[str, Any]) -> None:
    problems = []
    if config["interval"] <= 0:  # here, to come with the rules' problems, not before them
        problems.append(ConfigProblem(f"{SECTION}.interval", f"must be seconds, above 0, "
                                                             f"got {config['interval']!r}"))
    for key, check in (("rules", rule_problems), ("notifiers", notifier_problems)):
        tables = config[key]
        for name, table in tables.items():
            problems += check(f"{SECTION}.{key}", name, table)
    if problems:
        raise ConfigError(problems)


@hookimpl
def inferno_lifespan(kernel: KernelHandle) -> AbstractAsyncContextManager[None]:
    return _serve(kernel)


@asynccontextmanager
async def _serve(kernel: KernelHandle) -> AsyncIterator[None]:
    config = kernel.plugin_config(SECTION)
    if not config["enabled"]:
        yield
        return
    scheduler = _service(kernel, "scheduler", "alerts are evaluated on the scheduler: enable "
                                              "[schedulers.apscheduler] or set "
                                              "alerts.enabled = false")
    metrics = _service(kernel, "metrics", "alerts read the metrics: enable "
                                          "[exporters.prometheus] or set alerts.enabled = false")
    rules = [Rule.from_config(name, table) for name, table in config["rules"].items()]
    dispatcher = Dispatcher(build_notifiers(kernel, config["notifiers"]))
    engine = AlertEngine(rules, metrics.registry, dispatcher.deliver)
    engine.baseline()
    dispatcher.start()
    try:
        scheduler.add_job(Job(JOB_ID, engine.evaluate, "interval",
                              seconds=float(config["interval"])))
        kernel.provide(SERVICE, engine)
        log.info("alerts on", rules=[r.name for r in rules], interval=config["interval"],
                 notifiers=list(dispatcher.notifiers))
        yield
    finally:
        if JOB_ID in scheduler.jobs():
            scheduler.remove_job(JOB_ID)
        await dispatcher.close(SEND_WAIT)


def build_notifiers(kernel: KernelHandle, tables: Mapping[str, Any]) -> dict[str, Notifier]:
    """The profile's notifiers (the log alone when it names none)."""
    factories: dict[str, NotifierFactory] = dict(BUILT_IN)
    for offered in kernel.hook.inferno_alert_notifiers():
        for kind, factory in (offered or {}).items():
            if kind in factories:
                raise AlertsError(f"two plugins offer the alert notifier kind {kind!r}")
            factories[kind] = factory
    if not tables:
        return {"log": BUILT_IN["log"]("log", {"kind": "log"})}
    notifiers = {}
    for name, table in tables.items():
        factory = factories.get(table["kind"])
        if factory is None:
            raise AlertsError(f"{SECTION}.notifiers.{name}.kind: no notifier kind "
                              f"{table['kind']!r} (kinds: {', '.join(sorted(factories))})")
        notifiers[name] = factory(name, table)
    return notifiers


def _service(kernel: KernelHandle, name: str, hint: str) -> Any:
    try:
        return kernel.service(name)
    except LookupError:
        raise AlertsError(f"no {name} service: {hint}") from None
