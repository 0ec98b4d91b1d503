"""The BeiError family: every failure a user can see, with its message and HTTP status.

The HTTP status of each error type is set in one table, `HTTP_STATUS`, read by the API layer.
Build-time errors (config, checkpoint, model, export, engine) carry a status too, so that a
server that builds on start answers with a meaningful code if it is ever asked.
"""

from __future__ import annotations

import re

_PATH = re.compile(r"(?<![\w.])(?:/|~/)[^\s'\",;:()\[\]]+")


class BeiError(Exception):
    """Base of every error bei reports to a user. `message` is meant to be read by a person."""

    error_type: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def status(self) -> int:
        return http_status(self)


# --- build time -----------------------------------------------------------------------------
class ConfigError(BeiError):
    """config.yaml is invalid: the message names the field path, the value and the allowed ones."""

    error_type = "config_error"


class CheckpointError(BeiError):
    """The checkpoint cannot be fetched or lacks a file bei needs."""

    error_type = "checkpoint_error"


class ModelError(BeiError):
    """The checkpoint is of an architecture, task or pooling bei cannot serve."""

    error_type = "model_error"


class ExportError(BeiError):
    """Export or verification of the engine graph failed."""

    error_type = "export_error"


class EngineError(BeiError):
    """An engine directory is missing, incomplete, or built for another target."""

    error_type = "engine_error"


# --- request time ---------------------------------------------------------------------------
class ValidationError(BeiError):
    """A request's JSON or fields are invalid."""

    error_type = "validation"


class EmptyInputError(BeiError):
    """A request has no input, or an empty string."""

    error_type = "empty"


class InputTooLongError(BeiError):
    """An input is longer than the engine's limit and truncation is off."""

    error_type = "validation"


class TooManyInputsError(BeiError):
    """More inputs in one request than `max_client_batch_size`."""

    error_type = "validation"


class WrongRouteError(BeiError):
    """A route the served engine's task cannot answer."""

    error_type = "wrong_route"


class ModelNotFoundError(BeiError):
    """A request names a model this server does not serve."""

    error_type = "model_not_found"


class EngineFailedError(BeiError):
    """The engine call of a batch failed: only that batch's requests fail."""

    error_type = "backend"


class PayloadTooLargeError(BeiError):
    error_type = "payload_limit"


class UnsupportedEncodingError(BeiError):
    """A request body in a Content-Encoding bei does not decode (it takes gzip and deflate)."""

    error_type = "unsupported_media_type"


class OverloadedError(BeiError):
    error_type = "overloaded"


class NotReadyError(BeiError):
    error_type = "unhealthy"


class UnauthorizedError(BeiError):
    """A request without the server's API key (`--api-key`) in `Authorization: Bearer <key>`."""

    error_type = "unauthorized"


class RequestTimeoutError(BeiError):
    """A request body that did not arrive within `--body-timeout`."""

    error_type = "timeout"


class RouteNotFoundError(BeiError):
    error_type = "not_found"


class MethodNotAllowedError(BeiError):
    error_type = "method_not_allowed"


HTTP_STATUS: dict[type[BeiError], int] = {
    ValidationError: 422,
    InputTooLongError: 422,
    TooManyInputsError: 422,
    EmptyInputError: 400,
    WrongRouteError: 400,
    ModelNotFoundError: 404,
    EngineFailedError: 424,
    PayloadTooLargeError: 413,
    UnsupportedEncodingError: 415,
    OverloadedError: 429,
    NotReadyError: 503,
    UnauthorizedError: 401,
    RequestTimeoutError: 408,
    RouteNotFoundError: 404,
    MethodNotAllowedError: 405,
    ConfigError: 400,
    CheckpointError: 500,
    ModelError: 500,
    ExportError: 500,
    EngineError: 500,
    BeiError: 500,
}


def http_status(error: BeiError) -> int:
    """The HTTP status of an error: the entry of its nearest class in `HTTP_STATUS`."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def client_safe(error: BaseException, limit: int = 200) -> str:
    """An unexpected exception as a client may read it: its type and first line, paths replaced by
    `<path>`, cut to `limit` characters. The whole error belongs in the server log."""
    first = (str(error).strip().splitlines() or [""])[0]
    text = _PATH.sub("<path>", first)
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
