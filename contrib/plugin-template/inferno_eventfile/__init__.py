"""An Inferno plugin that appends every kernel event to a JSON-lines file.

Two plugins ship in this one distribution, each an entry point:

- ``eventfile`` (group ``inferno.exporters``): the driver
  :class:`~inferno_eventfile.exporter.EventFileExporter`, enabled by a
  profile's ``[exporters.eventfile]`` table;
- ``eventfile-cli`` (group ``inferno.plugins``): the hook module
  :mod:`inferno_eventfile.commands`, which adds ``inferno events``.

Nothing here registers itself at import time: the kernel finds both by name.
"""

from .exporter import NAME, EventFileExporter

__all__ = ["NAME", "EventFileExporter"]
