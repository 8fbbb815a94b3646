"""The hook the ``alerts`` plugin offers (added with ``inferno_add_hookspecs``)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import pluggy

from inferno.kernel.hookspecs import hookspec

if TYPE_CHECKING:
    from .notifiers import NotifierFactory


@hookspec
def inferno_alert_notifiers() -> Mapping[str, NotifierFactory] | None:
    """Called once when alerting starts, before the profile's notifiers are built.

    Return further notifier kinds, ``{kind: factory}``: ``factory(name, config)`` gets the
    notifier's name and its table under ``[alerts.notifiers]`` (``kind`` included) and
    returns an object with ``async send(alert)`` (and optionally ``async close()``).
    ``send`` raises to report an alert it could not deliver. Built in: ``webhook``, ``log``.
    """


def add_to(plugin_manager: pluggy.PluginManager) -> None:
    """Add this spec unless it is there (the plugin adds it, and so may a third party)."""
    if not hasattr(plugin_manager.hook, "inferno_alert_notifiers") or \
            plugin_manager.hook.inferno_alert_notifiers.spec is None:
        plugin_manager.add_hookspecs(sys.modules[__name__])
