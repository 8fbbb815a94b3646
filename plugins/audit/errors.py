"""The audit log's errors. Callers catch :class:`AuditUnavailable` to fail closed (503)."""

from __future__ import annotations

from inferno.kernel.errors import InfernoError


class AuditError(InfernoError):
    """Base of the audit log's errors. Messages never contain key material."""


class AuditUnavailable(AuditError):
    """A record could not be written (a full disk, a lost mount, the log is closed).

    Code that records an action refuses the action when the log's ``fail_closed`` is set:
    an action that cannot be audited must not happen silently.
    """


class AuditKeyError(AuditError):
    """Key material that is missing or malformed, or no key for a record's key id."""


class AuditReadError(AuditError):
    """A record that cannot be read back (``query`` and ``export``); ``verify`` says why."""
