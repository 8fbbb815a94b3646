"""Errors about models and model files; each names the model or file and the reason."""

from __future__ import annotations

from pathlib import Path

from inferno.kernel.errors import InfernoError

REDOWNLOAD = "download or copy it again"


def truncated(what: str, size: int) -> str:
    """The reason for a file that ends before its header says it should."""
    return f"truncated: {what} but the file ends at byte {size}; {REDOWNLOAD}"


class ModelError(InfernoError):
    """Something is wrong with a model: ``subject`` is its name or its file."""

    def __init__(self, subject: str | Path, reason: str) -> None:
        self.subject = str(subject)
        self.reason = reason
        super().__init__(f"{self.subject}: {reason}")


class ModelFileError(ModelError):
    """A model file is missing, unreadable, truncated or not the format it claims."""


class ModelNotFound(ModelError):
    """No model is registered under the name a request used."""


class NoBackend(ModelError):
    """The model's format is known but no enabled backend loads it."""


class RequestError(ModelError):
    """A request for a model is invalid: bad sampling values, too long a prompt, a bad schema."""
