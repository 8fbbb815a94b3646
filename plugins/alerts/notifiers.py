"""Notifiers: where alerts go. Built in: ``webhook`` (POST JSON, retried) and ``log``.

Each notifier gets its own queue and worker (``Dispatcher``), so a webhook retrying with
backoff delays neither the evaluation nor the other notifiers, and the firing and the
resolution of an alert reach one notifier in that order. Nothing here logs a webhook's
URL or headers: either may carry a token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import aiohttp

from inferno.kernel import ConfigProblem
from inferno.kernel.logs import get_logger

log = get_logger("alerts")

WEBHOOK_DEFAULTS: Mapping[str, Any] = {
    "kind": "webhook", "url": "", "headers": {}, "timeout": 10.0, "retries": 3, "backoff": 1.0}
LOG_DEFAULTS: Mapping[str, Any] = {"kind": "log"}


class Notifier(Protocol):
    """Sends one alert (a JSON-ready dict; docs/alerts.md); raises when it could not."""

    async def send(self, alert: Mapping[str, Any]) -> None: ...


NotifierFactory = Callable[[str, Mapping[str, Any]], Notifier]


class DeliveryFailed(Exception):
    """An alert a notifier gave up on; the message never holds a URL or a header."""


class LogNotifier:
    """Writes each alert as one structured warning line."""

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        self.name = name

    async def send(self, alert: Mapping[str, Any]) -> None:
        log.warning(f"alert {alert['status']}", alert=alert["alert"],
                    severity=alert["severity"], summary=alert["summary"],
                    value=alert["value"], threshold=alert["threshold"],
                    labels=alert["labels"], notifier=self.name)


class WebhookNotifier:
    """POSTs each alert as JSON; retries connection errors, timeouts, 429 and 5xx answers
    ``retries`` times, waiting ``backoff`` seconds, then twice that, and so on."""

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        settings = {**WEBHOOK_DEFAULTS, **config}
        self.name = name
        self._url = str(settings["url"])
        self._headers = dict(settings["headers"])
        self.timeout = float(settings["timeout"])
        self.retries = int(settings["retries"])
        self.backoff = float(settings["backoff"])
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the URL or the headers
        return f"WebhookNotifier({self.name!r})"

    async def send(self, alert: Mapping[str, Any]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                log.warning("webhook failed, retrying", notifier=self.name,
                            alert=alert["alert"], status=alert["status"], problem=problem,
                            attempt=attempt, retry_in=delay)
                await asyncio.sleep(delay)
            try:
                async with self._session.post(self._url, json=dict(alert),
                                              headers=self._headers,
                                              allow_redirects=False) as response:
                    if response.status < 300:
                        log.info("alert sent", notifier=self.name, alert=alert["alert"],
                                 status=alert["status"], attempts=attempt + 1)
                        return
                    problem = f"HTTP {response.status}"
                    if response.status < 500 and response.status != 429:
                        break  # the receiver refuses this alert: asking again changes nothing
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
        raise DeliveryFailed(f"webhook {self.name!r} gave up after {attempt + 1} "
                             f"attempt(s): {problem}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


BUILT_IN: Mapping[str, NotifierFactory] = {"webhook": WebhookNotifier, "log": LogNotifier}


class Dispatcher:
    """Hands every alert to every notifier, each in order on a worker of its own."""

    def __init__(self, notifiers: Mapping[str, Notifier]) -> None:
        self.notifiers = dict(notifiers)
        self.delivered = dict.fromkeys(self.notifiers, 0)
        self.failed = dict.fromkeys(self.notifiers, 0)
        self._queues: dict[str, asyncio.Queue[Mapping[str, Any]]] = {}
        self._workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for name, notifier in self.notifiers.items():
            queue: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()
            self._queues[name] = queue
            self._workers.append(asyncio.create_task(self._work(name, notifier, queue),
                                                     name=f"alerts notifier {name}"))

    def deliver(self, alert: Mapping[str, Any]) -> None:
        for queue in self._queues.values():
            queue.put_nowait(alert)

    async def close(self, timeout: float) -> None:
        """Let queued alerts go out for up to ``timeout`` seconds, then stop."""
        waiting = [asyncio.create_task(q.join()) for q in self._queues.values()]
        if waiting:
            _, unsent = await asyncio.wait(waiting, timeout=timeout)
            for task in unsent:
                task.cancel()
            if unsent:
                log.warning("alerts left unsent at shutdown", timeout=timeout)
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        for notifier in self.notifiers.values():
            close = getattr(notifier, "close", None)
            if close is not None:
                await close()

    async def _work(self, name: str, notifier: Notifier,
                    queue: asyncio.Queue[Mapping[str, Any]]) -> None:
        while True:
            alert = await queue.get()
            try:
                await notifier.send(alert)
                self.delivered[name] += 1
            except Exception as exc:  # one notifier's failure must not stop the others
                self.failed[name] += 1
                log.error("alert not delivered", notifier=name, alert=alert["alert"],
                          status=alert["status"], error=f"{type(exc).__name__}: {exc}")
            finally:
                queue.task_done()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_NUMBERS: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "timeout": (lambda v: _number(v) and v > 0, "must be seconds, above 0"),
    "backoff": (lambda v: _number(v) and v >= 0, "must be seconds, at least 0"),
    "retries": (lambda v: _number(v) and isinstance(v, int) and v >= 0,
                "must be a whole number, at least 0"),
}


def notifier_problems(path: str, name: str, table: Any) -> list[ConfigProblem]:
    """Problems in one built-in notifier's table; other kinds check their own at start."""
    where = f"{path}.{name}"
    if not isinstance(table, Mapping) or not isinstance(table.get("kind"), str):
        return [ConfigProblem(f"{where}.kind", "a notifier needs a kind: "
                                               f"{', '.join(BUILT_IN)} or one a plugin adds")]
    defaults = {"webhook": WEBHOOK_DEFAULTS, "log": LOG_DEFAULTS}.get(table["kind"])
    if defaults is None:
        return []
    problems = [ConfigProblem(f"{where}.{key}", f"unknown key; a {table['kind']} notifier "
                                                f"has {', '.join(defaults)}")
                for key in table if key not in defaults]
    if table["kind"] != "webhook":
        return problems
    settings = {**defaults, **table}
    url = settings["url"]
    if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        problems.append(ConfigProblem(f"{where}.url", "must be an http:// or https:// URL"))
    headers = settings["headers"]
    if not (isinstance(headers, Mapping) and all(isinstance(v, str) for v in headers.values())):
        problems.append(ConfigProblem(f"{where}.headers", "must be a table of header names "
                                                          "to strings"))
    for key, (valid, message) in _NUMBERS.items():
        if not valid(settings[key]):
            problems.append(ConfigProblem(f"{where}.{key}",
                                          f"{message}, got {settings[key]!r}"))
    return problems
