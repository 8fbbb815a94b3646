"""Structured logging: readable console lines or JSON lines, always on stderr.

Every plugin gets a logger bound to its name; a request id bound with
:func:`request_context` travels in contextvars into every line the request
causes. Standard-library loggers (used by libraries) go through the same
renderer.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}


def configure_logging(fmt: str = "console", level: str = "info",
                      levels: Mapping[str, str] | None = None,
                      stream: TextIO | None = None) -> None:
    """Set up structlog and the standard library's root logger for this process."""
    per_plugin = {name: LEVELS[value] for name, value in (levels or {}).items()}
    default = LEVELS[level]
    out = stream or sys.stderr

    def by_plugin(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        threshold = per_plugin.get(str(event.get("plugin", "")), default)
        if LEVELS.get(method if method != "exception" else "error", logging.INFO) < threshold:
            raise structlog.DropEvent
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        # tracebacks without local variables: they would print requests' credentials
        renderer = structlog.dev.ConsoleRenderer(
            colors=out.isatty(),
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)
            if _has_rich() else structlog.dev.plain_traceback)
    structlog.configure(
        processors=[*shared, by_plugin, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(min([default, *per_plugin.values()])),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    # Per-plugin levels apply to Inferno's own lines (filtered above); a library's
    # standard-library lines keep the default level even when a plugin is at debug.
    handler.addFilter(lambda record: isinstance(record.msg, dict) or record.levelno >= default)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=shared,
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(min([default, *per_plugin.values()]))


def get_logger(plugin: str | None = None) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to ``plugin`` (the kernel's own when ``None``).

    It stays lazy: each call uses the logging configuration in force at that
    moment, so loggers made before ``configure_logging`` still follow it.
    """
    if plugin:
        return structlog.get_logger("inferno", plugin=plugin)  # type: ignore[no-any-return]
    return structlog.get_logger("inferno")  # type: ignore[no-any-return]


@contextmanager
def request_context(request_id: str | None = None, **values: Any) -> Iterator[str]:
    """Bind a request id (generated when missing) into every log line inside the block."""
    rid = request_id or uuid.uuid4().hex
    with structlog.contextvars.bound_contextvars(request_id=rid, **values):
        yield rid


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True
