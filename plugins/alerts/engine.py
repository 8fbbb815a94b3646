"""The alert state machine: inactive → pending → firing → resolved (inactive again).

A rule whose condition holds becomes pending; once it has held for ``for`` seconds the
alert fires and is handed to the notifiers once. While it keeps holding nothing more is
sent; the first evaluation where it no longer holds (or the metric has no data) resolves
it, and the resolution is sent once too. Pending that ends early sends nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from .rules import Rule, Sample

INACTIVE, PENDING, FIRING = "inactive", "pending", "firing"


class Registry(Protocol):
    """What the engine needs of a prometheus_client ``CollectorRegistry``."""

    def collect(self) -> Iterable[Any]: ...


@dataclasses.dataclass
class AlertState:
    state: str = INACTIVE
    #: ``clock()`` time the condition started to hold.
    since: float | None = None
    #: Wall-clock time the alert fired (``starts_at`` of its notifications).
    fired_at: float | None = None
    value: float | None = None


class AlertEngine:
    """Evaluates every rule against the registry and hands each transition to ``deliver``."""

    def __init__(self, rules: Iterable[Rule], registry: Registry,
                 deliver: Callable[[dict[str, Any]], None], *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.rules = list(rules)
        self.registry = registry
        self.deliver = deliver
        self.clock = clock
        self.wall_clock = wall_clock
        self.alerts = {rule.name: AlertState() for rule in self.rules}
        self.evaluations = 0
        self._evaluated = asyncio.Condition()

    def baseline(self) -> None:
        """Read every counter once, so that the first evaluation has something to compare
        with (what happened before alerting started never fires)."""
        now, samples = self.clock(), self._samples()
        for rule in self.rules:
            rule.observe(now, samples)

    async def evaluate(self) -> None:
        """One evaluation (the scheduler's job): synchronous inside, so it never interleaves
        with another."""
        self.step()
        async with self._evaluated:
            self._evaluated.notify_all()

    async def evaluated(self, count: int) -> None:
        """Wait until ``count`` evaluations have run (for tests and tools, not for rules)."""
        async with self._evaluated:
            await self._evaluated.wait_for(lambda: self.evaluations >= count)

    def step(self) -> None:
        now, samples = self.clock(), self._samples()
        for rule in self.rules:
            value = rule.observe(now, samples)
            self._advance(rule, self.alerts[rule.name], value, now)
        self.evaluations += 1

    def states(self) -> Mapping[str, Mapping[str, Any]]:
        """``{rule: {state, value}}``: where every alert stands now."""
        return {name: {"state": alert.state, "value": alert.value}
                for name, alert in self.alerts.items()}

    def _advance(self, rule: Rule, alert: AlertState, value: float | None, now: float) -> None:
        alert.value = value
        if not rule.breached(value):
            if alert.state == FIRING:
                self.deliver(self._notification(rule, alert, "resolved"))
            alert.state, alert.since, alert.fired_at = INACTIVE, None, None
            return
        if alert.state == INACTIVE:
            alert.state, alert.since = PENDING, now
        if alert.state == PENDING and now - (alert.since or now) >= rule.for_seconds:
            alert.state, alert.fired_at = FIRING, self.wall_clock()
            self.deliver(self._notification(rule, alert, "firing"))

    def _notification(self, rule: Rule, alert: AlertState, status: str) -> dict[str, Any]:
        """The payload every notifier gets (docs/alerts.md shows it)."""
        return {
            "status": status,
            "alert": rule.name,
            "severity": rule.severity,
            "summary": rule.summary,
            "labels": dict(rule.labels),
            "kind": rule.kind,
            "metric": rule.metric,
            "value": alert.value,
            "op": rule.op,
            "threshold": rule.threshold,
            "for": rule.for_seconds,
            "starts_at": _iso(alert.fired_at or self.wall_clock()),
            "ends_at": _iso(self.wall_clock()) if status == "resolved" else None,
            "source": "inferno",
        }

    def _samples(self) -> list[Sample]:
        return [(sample.name, sample.labels, sample.value)
                for family in self.registry.collect() for sample in family.samples]


def _iso(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")
