"""Error types: each says what was wrong, where, and what to do about it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class InfernoError(Exception):
    """Base of every error Inferno raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in the merged configuration."""

    key: str
    message: str
    source: str = ""

    def __str__(self) -> str:
        where = f" (from {self.source})" if self.source else ""
        return f"{self.key}: {self.message}{where}"


class ConfigError(InfernoError):
    """The configuration has one or more problems; all of them are listed."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"configuration has {count} {noun}:\n{lines}")


class ProfileNotFound(InfernoError):
    """A profile name or path that does not resolve to a file."""


class PluginError(InfernoError):
    """A plugin failed to load, to start or to stop."""

    def __init__(self, plugin: str, reason: str) -> None:
        self.plugin = plugin
        self.reason = reason
        super().__init__(f"plugin {plugin!r}: {reason}")


class PluginConflict(InfernoError):
    """Two distributions claim the same plugin name."""


class ResourceExhausted(InfernoError):
    """A reservation does not fit in its budget even after eviction."""


class Draining(InfernoError):
    """The kernel is shutting down and admits no new requests."""


class LifecycleError(InfernoError):
    """An operation that the kernel's current state does not allow."""
