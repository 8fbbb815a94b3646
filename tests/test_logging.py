"""Logging: console or JSON lines, a logger per plugin, a request id in every line."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from inferno.kernel.logs import configure_logging, get_logger, request_context


@pytest.fixture
def stream():
    out = io.StringIO()
    yield out
    configure_logging("console", "warning")  # leave the process as the CLI would
    logging.getLogger().handlers.clear()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_plugin_level_time_and_request_id(stream):
    configure_logging("json", "info", stream=stream)
    log = get_logger("http")
    with request_context("req-42"):
        log.info("handled", status=200)
    log.info("idle")
    first, second = lines(stream)
    assert first["event"] == "handled"
    assert first["plugin"] == "http"
    assert first["request_id"] == "req-42"
    assert first["level"] == "info"
    assert first["timestamp"].endswith("Z")
    assert "request_id" not in second


async def test_concurrent_requests_keep_their_own_ids(stream):
    configure_logging("json", "info", stream=stream)
    log = get_logger("http")

    async def handle(rid: str) -> None:
        with request_context(rid):
            await asyncio.sleep(0)
            log.info("step", expected=rid)

    await asyncio.gather(*(handle(f"r{i}") for i in range(5)))
    assert all(line["request_id"] == line["expected"] for line in lines(stream))


def test_a_request_id_is_generated_when_missing(stream):
    configure_logging("json", "info", stream=stream)
    with request_context() as rid:
        get_logger("ws").info("x")
    assert lines(stream)[0]["request_id"] == rid
    assert len(rid) == 32


def test_console_format_is_one_readable_line(stream):
    configure_logging("console", "info", stream=stream)
    get_logger("kernel").info("ready", drivers=2)
    (line,) = stream.getvalue().splitlines()
    assert "ready" in line
    assert "drivers=2" in line
    assert "plugin=kernel" in line
    assert not line.startswith("{")


def test_levels_per_plugin(stream):
    configure_logging("json", "warning", levels={"http": "debug"}, stream=stream)
    get_logger("http").debug("chatty")
    get_logger("cache").info("quiet")
    get_logger("cache").warning("loud")
    assert [(line["plugin"], line["event"]) for line in lines(stream)] == [
        ("http", "chatty"), ("cache", "loud")]


def test_standard_library_loggers_share_the_format(stream):
    configure_logging("json", "info", stream=stream)
    logging.getLogger("some.library").warning("from a library")
    (line,) = lines(stream)
    assert line["event"] == "from a library"
    assert line["level"] == "warning"


def test_a_plugin_at_debug_does_not_turn_on_library_debug_lines(stream):
    configure_logging("json", "info", levels={"http": "debug"}, stream=stream)
    logging.getLogger("asyncio").debug("Using selector: EpollSelector")
    get_logger("http").debug("wanted")
    assert [line["event"] for line in lines(stream)] == ["wanted"]
