"""Errors a client sees: an HTTP status and the OpenAI error envelope, whatever the protocol."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from inferno.kernel.errors import Draining, InfernoError, ResourceExhausted
from inferno.plugins.models.errors import (
    ModelError,
    ModelNotFound,
    NoBackend,
    RequestError,
)


class ApiError(InfernoError):
    """A request that cannot be served, said the way the client will read it.

    ``status`` is the HTTP status (WebSocket and stdin carry it in the error object too),
    ``param`` the request field at fault, ``code`` a stable machine-readable word, and
    ``retry_after`` the seconds a client should wait before trying again, when it should.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type_: str | None = None,
                 retry_after: float | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _type_for(status)
        self.retry_after = retry_after
        #: Further response headers (``X-RateLimit-Remaining``): HTTP sends them.
        self.headers = dict(headers or {})

    def envelope(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API writes it."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """A client mistake in the request body (400)."""
    return ApiError(400, message, param=param, code=code)


def _type_for(status: int) -> str:
    if status in (401, 403):
        return "authentication_error" if status == 401 else "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


#: Parameter names a backend's message may start with ("temperature must be ...").
_PARAMS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
           "frequency_penalty", "seed", "max_tokens", "stop", "logit_bias", "response_format",
           "schema")


@contextmanager
def as_api_errors() -> Iterator[None]:
    """Raise Inferno's own errors (a model not found, a bad sampling value, draining) as the
    ``ApiError`` a client reads; anything else is a bug and goes up unchanged."""
    try:
        yield
    except ApiError:
        raise
    except InfernoError as exc:
        raise from_exception(exc) from exc


def from_exception(exc: BaseException) -> ApiError:
    """The client-facing form of any error a call raised; unexpected ones become a 500 that
    says nothing of the internals (they are logged in full by the caller)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ModelNotFound):
        return ApiError(404, f"model {exc.subject!r} not found: {exc.reason}", param="model",
                        code="model_not_found")
    if isinstance(exc, RequestError):
        param = next((p for p in _PARAMS if exc.reason.startswith(p)), None)
        if exc.reason.startswith("prompt of"):
            param, code = "messages", "context_length_exceeded"
        else:
            code = "invalid_value"
        return ApiError(400, str(exc), param=param, code=code)
    if isinstance(exc, NoBackend | ModelError):
        return ApiError(503, f"model unavailable: {exc}", code="model_unavailable")
    if isinstance(exc, Draining):
        return ApiError(503, str(exc), code="draining", retry_after=5)
    if isinstance(exc, ResourceExhausted):
        return ApiError(503, f"not enough memory to serve this request: {exc}",
                        code="insufficient_memory", retry_after=5)
    return ApiError(500, "internal error; the server log has the details "
                         f"({type(exc).__name__})", code="internal_error")
