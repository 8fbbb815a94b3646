"""Alerts: rules over a metrics registry, the pending → firing → resolved state machine on
a clock moved by hand, and the plugin in a running kernel sending to a real loopback
webhook receiver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from structlog.testing import capture_logs

from inferno.kernel import ConfigError, PluginError, hookimpl
from inferno.plugins.alerts.engine import AlertEngine
from inferno.plugins.alerts.notifiers import DeliveryFailed, WebhookNotifier
from inferno.plugins.alerts.rules import Rule, histogram_quantile

PATIENCE = 20.0


class Metrics:
    """The metrics the rules read, under the exporter's names, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("inferno_queue_depth", "Calls waiting.", ["model"],
                                 registry=self.registry)
        self.requests = Counter("inferno_requests_total", "Calls.",
                                ["operation", "model", "protocol", "outcome"],
                                registry=self.registry)
        self.first_token = Histogram("inferno_time_to_first_token_seconds", "TTFT.", ["model"],
                                     buckets=(0.5, 1, 2, 4, 8), registry=self.registry)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rule(name: str = "deep_queue", **settings: Any) -> Rule:
    return Rule.from_config(name, {"kind": "gauge", "metric": "inferno_queue_depth",
                                   "threshold": 5, **settings})


def engine_for(metrics: Metrics, *rules: Rule) -> tuple[AlertEngine, Clock, list[dict]]:
    clock, sent = Clock(), []
    engine = AlertEngine(rules, metrics.registry, sent.append, clock=clock)
    engine.baseline()
    return engine, clock, sent


def statuses(sent: list[dict]) -> list[tuple[str, str]]:
    return [(alert["alert"], alert["status"]) for alert in sent]


# --------------------------------------------------------------------------- the state machine


def test_an_alert_fires_once_after_for_and_resolves_once() -> None:
    metrics = Metrics()
    engine, clock, sent = engine_for(metrics, rule(**{"for": 60}))
    metrics.queue_depth.labels("tiny").set(9)
    engine.step()
    assert engine.states()["deep_queue"]["state"] == "pending"
    clock.now += 59
    engine.step()
    assert sent == []
    clock.now += 1
    engine.step()
    clock.now += 30
    engine.step()
    assert statuses(sent) == [("deep_queue", "firing")]
    assert sent[0]["value"] == 9
    metrics.queue_depth.labels("tiny").set(2)
    clock.now += 15
    engine.step()
    engine.step()
    assert statuses(sent) == [("deep_queue", "firing"), ("deep_queue", "resolved")]
    assert sent[1]["starts_at"] == sent[0]["starts_at"]
    assert sent[1]["ends_at"] is not None


def test_a_condition_that_ends_while_pending_sends_nothing() -> None:
    metrics = Metrics()
    engine, clock, sent = engine_for(metrics, rule(**{"for": 60}))
    metrics.queue_depth.labels("tiny").set(9)
    engine.step()
    metrics.queue_depth.labels("tiny").set(0)
    clock.now += 61
    engine.step()
    metrics.queue_depth.labels("tiny").set(9)
    clock.now += 1
    engine.step()
    assert engine.states()["deep_queue"]["state"] == "pending"
    assert sent == []


def test_a_ratio_counts_only_the_window() -> None:
    metrics = Metrics()
    for _ in range(50):  # errors long ago: outside the window
        metrics.requests.labels("chat", "tiny", "http", "server_error").inc()
    errors = rule("errors", kind="ratio", metric="inferno_requests_total", threshold=0.05,
                  window=300, numerator={"outcome": ["server_error", "client_error"]})
    engine, clock, sent = engine_for(metrics, errors)
    clock.now += 600
    metrics.requests.labels("chat", "tiny", "http", "ok").inc(95)
    metrics.requests.labels("chat", "tiny", "http", "server_error").inc(3)
    engine.step()
    assert engine.states()["errors"]["value"] == pytest.approx(3 / 98)
    assert sent == []
    clock.now += 10
    metrics.requests.labels("chat", "tiny", "http", "client_error").inc(5)
    engine.step()
    assert engine.states()["errors"]["value"] == pytest.approx(8 / 103)
    assert statuses(sent) == [("errors", "firing")]


def test_a_quantile_reads_the_bucket_increase_over_the_window() -> None:
    metrics = Metrics()
    for _ in range(100):
        metrics.first_token.labels("tiny").observe(0.1)
    slow = rule("slow_first_token", kind="quantile", metric="inferno_time_to_first_token_seconds",
                threshold=2, quantile=0.95, window=300)
    engine, clock, sent = engine_for(metrics, slow)
    clock.now += 60
    for _ in range(100):
        metrics.first_token.labels("tiny").observe(3.0)
    engine.step()
    assert engine.states()["slow_first_token"]["value"] == pytest.approx(3.9)
    assert statuses(sent) == [("slow_first_token", "firing")]


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {1.0: 50.0, 2.0: 90.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(1.0)
    assert histogram_quantile(0.7, buckets) == pytest.approx(1.5)
    assert histogram_quantile(0.95, buckets) == pytest.approx(2.0)
    assert histogram_quantile(0.95, {1.0: 0.0, float("inf"): 0.0}) is None


def test_an_increase_rule_fires_on_new_failures_only() -> None:
    metrics = Metrics()
    metrics.requests.labels("load", "tiny", "http", "server_error").inc(7)
    failures = rule("load_failures", kind="increase", metric="inferno_requests_total",
                    threshold=0, match={"outcome": "server_error"})
    engine, clock, sent = engine_for(metrics, failures)
    engine.step()
    assert sent == []
    metrics.requests.labels("load", "tiny", "http", "server_error").inc()
    clock.now += 15
    engine.step()
    assert statuses(sent) == [("load_failures", "firing")]


# --------------------------------------------------------------------------- webhook receiver


class Receiver:
    """A real HTTP server on loopback that records alerts and answers ``answers`` in turn
    (200 once they run out)."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers = list(answers or [])
        self.alerts: list[dict[str, Any]] = []
        self.attempts = 0
        self.headers: list[dict[str, str]] = []
        self.url = ""
        self.arrived = asyncio.Condition()

    async def received(self, count: int) -> None:
        """Wait until ``count`` alerts arrived."""
        async with asyncio.timeout(PATIENCE), self.arrived:
            await self.arrived.wait_for(lambda: len(self.alerts) >= count)

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        self.headers.append(dict(request.headers))
        status = self.answers.pop(0) if self.answers else 200
        if status == 200:
            self.alerts.append(await request.json())
            async with self.arrived:
                self.arrived.notify_all()
        return web.Response(status=status)


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[..., Any]]:
    """``await receiver(answers)``: a started ``Receiver``, stopped after the test."""
    runners: list[web.AppRunner] = []

    async def started(answers: list[int] | None = None) -> Receiver:
        target = Receiver(answers)
        app = web.Application()
        app.router.add_post("/hook", target.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        target.url = f"http://127.0.0.1:{port}/hook"
        return target

    yield started
    for runner in runners:
        await runner.cleanup()


ALERT = {"status": "firing", "alert": "deep_queue", "severity": "warning", "summary": "s",
         "labels": {}, "value": 9.0, "threshold": 5.0}


async def test_the_webhook_retries_a_failing_receiver_until_it_answers(receiver) -> None:
    target = await receiver([500, 500])
    webhook = WebhookNotifier("ops", {"kind": "webhook", "url": target.url, "retries": 3,
                                      "backoff": 0.01})
    with capture_logs() as logs:
        await webhook.send(ALERT)
    await webhook.close()
    assert target.attempts == 3
    assert target.alerts == [ALERT]
    retries = [e for e in logs if e["event"] == "webhook failed, retrying"]
    assert [e["problem"] for e in retries] == ["HTTP 500", "HTTP 500"]


async def test_webhook_secrets_never_appear_in_logs(receiver) -> None:
    target = await receiver([500, 500])
    webhook = WebhookNotifier("ops", {
        "kind": "webhook", "url": target.url + "?token=url-secret-42", "retries": 1,
        "backoff": 0.01, "headers": {"Authorization": "Bearer header-secret-42"}})
    with capture_logs() as logs, pytest.raises(DeliveryFailed) as failed:
        await webhook.send(ALERT)
    await webhook.close()
    assert target.headers[0]["Authorization"] == "Bearer header-secret-42"
    written = repr(logs) + str(failed.value) + repr(webhook)
    assert "secret-42" not in written


# --------------------------------------------------------------------------- in a kernel


def profile(target_url: str, **alerts: Any) -> dict[str, Any]:
    return {
        "schedulers": {"apscheduler": {}},
        "exporters": {"prometheus": {}},
        "alerts": {"enabled": True, "interval": 0.1, "rules": {
            "load_failures": {"kind": "increase", "metric": "inferno_model_load_failures_total",
                              "threshold": 0, "window": 0.5, "for": 0.2,
                              "severity": "critical", "labels": {"team": "ml"},
                              "summary": "a model failed to load"}},
            "notifiers": {"ops": {"kind": "webhook", "url": target_url, "backoff": 0.01},
                          "journal": {"kind": "log"}}, **alerts},
    }


async def evaluations(engine: AlertEngine, more: int) -> None:
    """Wait for ``more`` evaluations beyond those already run."""
    await asyncio.wait_for(engine.evaluated(engine.evaluations + more), PATIENCE)


async def test_an_alert_fires_and_resolves(make_kernel, receiver) -> None:
    target = await receiver()
    kernel = make_kernel(profile(target.url))
    with capture_logs() as logs:
        async with kernel.running():
            failures = kernel.service("metrics").metrics.load_failures
            engine = kernel.service("alerts")
            failures.labels("tiny", "load").inc()
            await evaluations(engine, 1)
            failures.labels("tiny", "load").inc()  # still failing: pending becomes firing
            await target.received(1)
            for _ in range(3):  # failing on: every evaluation sees a new failure
                failures.labels("tiny", "verify").inc()
                await evaluations(engine, 1)
            assert len(target.alerts) == 1  # still firing: not sent again
            await target.received(2)  # no failure for a window: resolved
            await evaluations(engine, 3)
    assert [a["status"] for a in target.alerts] == ["firing", "resolved"]
    firing = target.alerts[0]
    assert (firing["alert"], firing["severity"], firing["labels"]) \
        == ("load_failures", "critical", {"team": "ml"})
    assert firing["value"] >= 1
    lines = [e for e in logs if e["event"] in ("alert firing", "alert resolved")]
    assert [(e["event"], e["notifier"]) for e in lines] \
        == [("alert firing", "journal"), ("alert resolved", "journal")]
    assert lines[0]["log_level"] == "warning"


async def test_a_notifier_kind_a_plugin_adds_gets_the_alerts(make_kernel, receiver) -> None:
    target, kept, arrived = await receiver(), [], asyncio.Event()

    class Memory:
        def __init__(self, name: str, config: Any) -> None:
            self.config = config

        async def send(self, alert: Any) -> None:
            kept.append((self.config["channel"], alert["status"]))
            arrived.set()

    plugin = type("Pager", (), {"inferno_alert_notifiers": staticmethod(
        hookimpl(lambda: {"memory": Memory}))})
    kernel = make_kernel(profile(target.url, notifiers={
        "pager": {"kind": "memory", "channel": "#ops"}}),
        plugins={"pager": plugin})
    async with kernel.running():
        kernel.service("metrics").metrics.load_failures.labels("tiny", "load").inc()
        await asyncio.wait_for(arrived.wait(), PATIENCE)
    assert kept == [("#ops", "firing")]


async def test_alerts_without_a_scheduler_refuse_to_start(make_kernel, receiver) -> None:
    target = await receiver()
    settings = profile(target.url)
    del settings["schedulers"]
    kernel = make_kernel(settings)
    with pytest.raises(PluginError, match=r"enable \[schedulers\.apscheduler\]"):
        await kernel.start()


async def test_an_unknown_notifier_kind_stops_the_start(make_kernel, receiver) -> None:
    target = await receiver()
    kernel = make_kernel(profile(target.url, notifiers={"pager": {"kind": "pagerduty"}}),
                         )
    with pytest.raises(PluginError, match=r"alerts\.notifiers\.pager\.kind: no notifier kind "
                                          r"'pagerduty' \(kinds: log, webhook\)"):
        await kernel.start()


def test_config_errors_name_their_keys(make_kernel) -> None:
    with pytest.raises(ConfigError) as caught:
        make_kernel({"alerts": {"enabled": True, "interval": 0, "rules": {
            "slow": {"kind": "quantile", "metric": "inferno ttft", "quantile": 95,
                     "threshold": "2s", "fore": 300},
            "errors": {"kind": "ratio", "metric": "inferno_requests_total", "threshold": 0.05},
        }, "notifiers": {
            "ops": {"kind": "webhook", "url": "ftp://hooks.example/x?token=t0p", "retries": -1},
            "mute": {},
        }}})
    problems = {p.key: p.message for p in caught.value.problems}
    assert set(problems) == {
        "alerts.interval", "alerts.rules.slow.metric", "alerts.rules.slow.quantile",
        "alerts.rules.slow.threshold", "alerts.rules.slow.fore",
        "alerts.rules.errors.numerator", "alerts.notifiers.ops.url",
        "alerts.notifiers.ops.retries", "alerts.notifiers.mute.kind"}
    assert "t0p" not in str(caught.value)
