"""The eventfile exporter, specified through a real kernel.

``make_kernel`` and ``run_kernel`` come from the installed ``inferno`` (its
``pytest11`` entry point): no import, no conftest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from inferno.kernel import ConfigError, Kernel

from inferno_eventfile import EventFileExporter

PLUGINS = {"eventfile": EventFileExporter}


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def nothing(kernel: Kernel) -> None:
    """A scenario that only starts and stops the kernel."""


def test_a_relative_path_is_inside_the_drivers_data_folder(make_kernel, run_kernel,
                                                           inferno_data_dir):
    kernel = make_kernel({"exporters": {"eventfile": {"path": "ev.jsonl"}}}, plugins=PLUGINS)
    run_kernel(kernel, nothing)
    assert (inferno_data_dir / "exporters" / "eventfile" / "ev.jsonl").is_file()


def test_every_event_is_one_json_line_with_topic_time_and_fields(make_kernel, run_kernel,
                                                                 inferno_data_dir):
    kernel = make_kernel({"exporters": {"eventfile": {"path": "ev.jsonl"}}}, plugins=PLUGINS)
    run_kernel(kernel, nothing)

    records = read_records(inferno_data_dir / "exporters" / "eventfile" / "ev.jsonl")
    started = [r for r in records if r["topic"] == "plugin.started"]
    assert [{"topic": "plugin.started", "plugin": "eventfile", "kind": "exporters"}.items()
            <= r.items() for r in started] == [True]
    states = [(r["state"], r["previous"]) for r in records if r["topic"] == "kernel.state"]
    # the first two were published before the exporter started: replayed from the bus
    assert states == [("configured", "created"), ("starting", "configured"),
                      ("running", "starting"), ("stopping", "running")]
    assert all(isinstance(r["time"], float) for r in records)


def test_an_absolute_path_is_used_as_given(make_kernel, run_kernel, tmp_path):
    target = tmp_path / "elsewhere" / "all.jsonl"
    kernel = make_kernel({"exporters": {"eventfile": {"path": str(target)}}}, plugins=PLUGINS)
    run_kernel(kernel, nothing)
    assert read_records(target)


def test_each_line_is_on_disk_as_soon_as_it_is_handled(make_kernel, run_kernel,
                                                       inferno_data_dir):
    async def read_while_running(kernel: Kernel) -> list[dict[str, Any]]:
        await kernel.bus.drain()
        return read_records(inferno_data_dir / "exporters" / "eventfile" / "events.jsonl")

    kernel = make_kernel({"exporters": {"eventfile": {}}}, plugins=PLUGINS)
    records = run_kernel(kernel, read_while_running)
    assert [r["topic"] for r in records] == ["kernel.state", "kernel.state", "plugin.started",
                                             "kernel.state"]


def test_topics_limits_the_file_to_those_topics(make_kernel, run_kernel, inferno_data_dir):
    kernel = make_kernel({"exporters": {"eventfile": {"topics": ["plugin.started"]}}},
                         plugins=PLUGINS)
    run_kernel(kernel, nothing)

    records = read_records(inferno_data_dir / "exporters" / "eventfile" / "events.jsonl")
    assert [r["topic"] for r in records] == ["plugin.started"]


def test_a_second_run_appends_to_the_same_file(make_kernel, run_kernel, inferno_data_dir):
    profile = {"exporters": {"eventfile": {"topics": ["plugin.started"]}}}
    run_kernel(make_kernel(profile, plugins=PLUGINS), nothing)
    run_kernel(make_kernel(profile, plugins=PLUGINS), nothing)

    records = read_records(inferno_data_dir / "exporters" / "eventfile" / "events.jsonl")
    assert len(records) == 2


def test_stop_leaves_the_bus(make_kernel, run_kernel):
    async def stop_the_exporter(kernel: Kernel) -> list[str]:
        await kernel.drivers("exporters")["eventfile"].stop()
        return [s["handler"] for s in kernel.bus.stats()["subscribers"]]

    kernel = make_kernel({"exporters": {"eventfile": {}}}, plugins=PLUGINS)
    handlers = run_kernel(kernel, stop_the_exporter)
    assert "EventFileExporter.export" not in handlers


@pytest.mark.parametrize(("key", "value"), [("topics", 5), ("topics", [1, 2]), ("path", "")])
def test_an_invalid_value_is_a_config_error_naming_its_key(make_kernel, key, value):
    with pytest.raises(ConfigError, match=rf"exporters\.eventfile\.{key}: must be"):
        make_kernel({"exporters": {"eventfile": {key: value}}}, plugins=PLUGINS)


def test_an_unknown_key_is_a_config_error_with_a_suggestion(make_kernel):
    with pytest.raises(ConfigError, match=r"exporters\.eventfile\.topic: unknown key; "
                                          r"did you mean 'topics'\?"):
        make_kernel({"exporters": {"eventfile": {"topic": ["kernel.state"]}}}, plugins=PLUGINS)
