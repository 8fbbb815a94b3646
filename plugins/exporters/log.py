"""The ``log`` exporter: every kernel event as a structured log line.

Enabled with ``[exporters.log]``. ``topics`` limits it to some event topics
(``kernel.state``, ``plugin.started`` ...); empty means all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dynaconf import Validator

from inferno.kernel import ConfigSpec, Event, Exporter, hookimpl
from inferno.kernel.events import Subscription

LEVELS = ("debug", "info", "warning")


class EventLogExporter(Exporter):
    """Writes every kernel event (or the chosen topics) to the log."""

    subscription: Subscription | None = None

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        return ConfigSpec(
            defaults={"level": "info", "topics": []},
            validators=[Validator("level", is_in=list(LEVELS))],
        )

    async def start(self) -> None:
        self.topics = frozenset(self.config["topics"])
        self.emit = getattr(self.log, self.config["level"])
        self.subscription = self.context.kernel.bus.subscribe(Event, self.export)

    def export(self, event: Event) -> None:
        if self.topics and event.topic not in self.topics:
            return
        fields: dict[str, Any] = {f.name: getattr(event, f.name)
                                  for f in dataclasses.fields(event) if f.name != "time"}
        self.emit("event", topic=event.topic, **fields)

    async def stop(self) -> None:
        if self.subscription is not None:
            self.subscription.cancel()
