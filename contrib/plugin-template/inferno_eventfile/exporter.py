"""The ``eventfile`` exporter: every kernel event (or the chosen topics) as a JSON line.

Enabled with ``[exporters.eventfile]``. ``path`` is the file; a relative path
lives in the driver's own data folder (``<data_dir>/exporters/eventfile/``).
``topics`` limits it to some event topics; empty means all.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from dynaconf import Validator
from inferno.kernel import ConfigSpec, Event, Exporter, hookimpl
from inferno.kernel.events import Subscription

from .records import to_json_line

#: The entry-point name, which is also the profile table's name and the pluggy name.
NAME = "eventfile"


def _is_file_path(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_topic_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)


def events_file(config: Mapping[str, Any], driver_dir: Path) -> Path:
    """Where the events go: ``config["path"]``, relative to the driver's data folder.

    Shared by the exporter and ``inferno events`` so both always name the same file.
    """
    path = Path(str(config["path"])).expanduser()
    return path if path.is_absolute() else driver_dir / path


class EventFileExporter(Exporter):
    """Appends every kernel event (or the chosen topics) to a JSON-lines file."""

    subscription: Subscription | None = None
    stream: TextIO | None = None

    @staticmethod
    @hookimpl
    def inferno_config_spec() -> ConfigSpec:
        """The defaults also fix each key's type; the validators give readable messages."""
        return ConfigSpec(
            defaults={"path": "events.jsonl", "topics": []},
            validators=[
                Validator("path", condition=_is_file_path, messages={
                    "condition": "{name} must be a non-empty file path, got {value!r}"}),
                Validator("topics", condition=_is_topic_list, messages={
                    "condition": "{name} must be a list of event topics such as "
                                 "[\"kernel.state\"], got {value!r}"}),
            ],
        )

    async def start(self) -> None:
        """Open the file for appending, so that each run adds to what earlier runs wrote."""
        self.path = events_file(self.config, self.context.data_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.topics = frozenset(self.config["topics"])
        self.stream = self.path.open("a", encoding="utf-8")
        # Subscribing to the base class receives every event, including those of
        # plugins that did not exist when this one was written; replay brings the
        # ones published before this exporter started (the backends starting...).
        self.subscription = self.context.kernel.bus.subscribe(Event, self.export, replay=True)

    def export(self, event: Event) -> None:
        """Write one event; flushed at once so a crash loses at most the line being written."""
        if self.stream is None or (self.topics and event.topic not in self.topics):
            return
        self.stream.write(to_json_line(event))
        self.stream.flush()

    async def stop(self) -> None:
        """Write what is still queued for us, then leave the bus and close the file.

        The bus delivers through a queue: ``close()`` handles what is queued, so the
        events published just before shutdown (``kernel.state`` → ``stopping``) are kept.
        """
        if self.subscription is not None:
            await self.subscription.close()
            self.subscription = None
        if self.stream is not None:
            self.stream.close()
            self.stream = None
