"""Alert rules: what each reads from the metrics registry and how it turns that into a value.

Counters and histograms only ever grow, so a rule over them keeps a short history of the
cumulative values it read and compares against the reading ``window`` seconds ago, as
PromQL's ``increase`` does (``histogram_quantile`` over increased buckets for quantiles).
A counter that went down (a series reset) counts from zero again.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from inferno.kernel import ConfigProblem

KINDS = ("gauge", "increase", "ratio", "quantile")
OPERATORS: Mapping[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
AGGREGATES: Mapping[str, Callable[[Iterable[float]], float]] = {
    "max": max, "min": min, "sum": sum}
SEVERITIES = ("info", "warning", "critical")
RULE_DEFAULTS: Mapping[str, Any] = {
    "kind": "gauge", "metric": "", "threshold": None, "op": ">", "for": 0.0, "window": 300.0,
    "quantile": 0.95, "match": {}, "numerator": {}, "aggregate": "max",
    "severity": "warning", "labels": {}, "summary": ""}
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

#: One sample as prometheus_client reports it: name, labels, value.
Sample = tuple[str, Mapping[str, str], float]
#: What a rule read at one time: a number, (errors, all), or {le: cumulative count}.
Reading = Any


@dataclasses.dataclass
class Rule:
    """One rule from ``[alerts.rules.<name>]``, with the history its window needs."""

    name: str
    kind: str
    metric: str
    threshold: float
    op: str
    for_seconds: float
    window: float
    quantile: float
    match: Mapping[str, frozenset[str]]
    numerator: Mapping[str, frozenset[str]]
    aggregate: str
    severity: str
    labels: Mapping[str, str]
    summary: str
    history: deque[tuple[float, Reading]] = dataclasses.field(default_factory=deque)

    @classmethod
    def from_config(cls, name: str, table: Mapping[str, Any]) -> Rule:
        merged = {**RULE_DEFAULTS, **table}
        return cls(name=name, kind=merged["kind"], metric=merged["metric"],
                   threshold=float(merged["threshold"]), op=merged["op"],
                   for_seconds=float(merged["for"]), window=float(merged["window"]),
                   quantile=float(merged["quantile"]), match=_selector(merged["match"]),
                   numerator=_selector(merged["numerator"]), aggregate=merged["aggregate"],
                   severity=merged["severity"], labels=dict(merged["labels"]),
                   summary=merged["summary"] or f"{name}: {merged['metric']} {merged['op']} "
                                                f"{merged['threshold']}")

    def observe(self, now: float, samples: list[Sample]) -> float | None:
        """The rule's value now (``None``: no data, which never fires), recording the
        reading for later windows."""
        reading = self._read(samples)
        if self.kind == "gauge":
            return reading  # type: ignore[no-any-return]
        baseline = self._baseline(now, reading)
        if self.kind == "increase":
            return _increase(reading, baseline)
        if self.kind == "ratio":
            errors, total = (_increase(c, b) for c, b in zip(reading, baseline, strict=True))
            return errors / total if total > 0 else None
        buckets = {le: _increase(c, baseline.get(le, 0.0)) for le, c in reading.items()}
        return histogram_quantile(self.quantile, buckets)

    def breached(self, value: float | None) -> bool:
        return value is not None and OPERATORS[self.op](value, self.threshold)

    def _read(self, samples: list[Sample]) -> Reading:
        if self.kind == "quantile":
            buckets: dict[float, float] = {}
            for _, labels, value in self._matching(samples, f"{self.metric}_bucket"):
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + value
            return buckets
        found = self._matching(samples, self.metric)
        if self.kind == "gauge":
            values = [value for _, _, value in found]
            return AGGREGATES[self.aggregate](values) if values else None
        total = sum(value for _, _, value in found)
        if self.kind == "ratio":
            errors = sum(value for _, labels, value in found
                         if _selected(labels, self.numerator))
            return (errors, total)
        return total

    def _matching(self, samples: list[Sample], name: str) -> list[Sample]:
        return [s for s in samples if s[0] == name and _selected(s[1], self.match)]

    def _baseline(self, now: float, reading: Reading) -> Reading:
        """The reading ``window`` seconds ago (the oldest one kept, early on)."""
        history = self.history
        history.append((now, reading))
        while len(history) > 1 and history[1][0] <= now - self.window:
            history.popleft()
        return history[0][1]


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of cumulative ``{upper bound: count}`` buckets, interpolated
    linearly inside a bucket as Prometheus does; ``None`` when the buckets are empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # the largest finite bound, as histogram_quantile says
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count)
        lower_bound, lower_count = bound, count
    return bounds[-1]


def _increase(current: float, baseline: float) -> float:
    return current - baseline if current >= baseline else current


def _selector(table: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    return {label: frozenset([value] if isinstance(value, str) else value)
            for label, value in table.items()}


def _selected(labels: Mapping[str, str], selector: Mapping[str, frozenset[str]]) -> bool:
    return all(labels.get(label) in values for label, values in selector.items())


# --------------------------------------------------------------------------- validation


def rule_problems(path: str, name: str, table: Any) -> list[ConfigProblem]:
    """Every problem in one rule table, each with its key."""
    where = f"{path}.{name}"
    if not isinstance(table, Mapping):
        return [ConfigProblem(where, "must be a table { kind, metric, threshold, for, ... }")]
    problems = [ConfigProblem(f"{where}.{key}", f"unknown key; a rule has "
                                                f"{', '.join(RULE_DEFAULTS)}")
                for key in table if key not in RULE_DEFAULTS]
    rule = {**RULE_DEFAULTS, **table}

    def check(key: str, ok: bool, message: str) -> None:
        if not ok:
            problems.append(ConfigProblem(f"{where}.{key}", f"{message}, got {rule[key]!r}"))

    check("kind", rule["kind"] in KINDS, f"must be one of: {', '.join(KINDS)}")
    check("metric", isinstance(rule["metric"], str) and bool(METRIC_NAME.fullmatch(
        rule["metric"])), "must name a metric (like inferno_queue_depth)")
    check("threshold", _number(rule["threshold"]), "must be a number")
    check("op", rule["op"] in OPERATORS, f"must be one of: {', '.join(OPERATORS)}")
    check("for", _number(rule["for"]) and rule["for"] >= 0, "must be seconds, at least 0")
    check("window", _number(rule["window"]) and rule["window"] > 0, "must be seconds, above 0")
    check("quantile", _number(rule["quantile"]) and 0 < rule["quantile"] < 1,
          "must be between 0 and 1 (0.95 for p95)")
    check("aggregate", rule["aggregate"] in AGGREGATES,
          f"must be one of: {', '.join(AGGREGATES)}")
    check("severity", rule["severity"] in SEVERITIES, f"must be one of: {', '.join(SEVERITIES)}")
    check("summary", isinstance(rule["summary"], str), "must be a string")
    check("labels", _strings(rule["labels"]), "must be a table of strings")
    for key in ("match", "numerator"):
        check(key, _label_selector(rule[key]),
              "must map label names to a value or a list of values")
    if rule["kind"] == "ratio" and not rule["numerator"]:
        problems.append(ConfigProblem(f"{where}.numerator", "a ratio rule needs the labels of "
                                                            "its numerator, like { outcome = "
                                                            "[\"server_error\"] }"))
    return problems


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _strings(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values())


def _label_selector(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(v, str) or (isinstance(v, list | tuple) and all(isinstance(i, str)
                                                                   for i in v))
        for v in value.values())
