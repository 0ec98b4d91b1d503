"""What stands before the routes: the API key (`--api-key`), and JSON bodies for 404 / 405 / 500.

With an API key, every route but /health (and /metrics, unless `--api-key-on-metrics`) needs
`Authorization: Bearer <key>`; the comparison takes the same time whatever the key sent
(`hmac.compare_digest`); a request without it is answered 401 in the server's JSON error shape.
"""

from __future__ import annotations

import hmac
import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from bei.api.http import ErrorStyle, error_response
from bei.api.routes import TASK_ROUTES
from bei.errors import BeiError, MethodNotAllowedError, RouteNotFoundError, UnauthorizedError
from bei.settings import ServeSettings

log = logging.getLogger("bei")


def open_paths(settings: ServeSettings) -> frozenset[str]:
    return frozenset({"/health"} if settings.api_key_on_metrics else {"/health", "/metrics"})


def authorized(header: str | None, key: bytes) -> bool:
    """Whether an Authorization header carries `Bearer <key>`, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    ok = hmac.compare_digest(given.strip().encode(), key)
    return ok and scheme.lower() == "bearer"


class ApiKeyMiddleware:
    """401 for requests without the key; /health (and /metrics) stay open."""

    def __init__(self, app: ASGIApp, settings: ServeSettings) -> None:
        self.app = app
        assert settings.api_key is not None
        self.key = settings.api_key.get_secret_value().encode()
        self.open = open_paths(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open:
            await self.app(scope, receive, send)
            return
        header = Request(scope).headers.get("authorization")
        if authorized(header, self.key):
            await self.app(scope, receive, send)
            return
        error = UnauthorizedError("missing or wrong API key: send `Authorization: Bearer <key>`")
        response = error_response(error, style_of(scope["path"]))
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)


def style_of(path: str) -> ErrorStyle:
    """The error shape of the API family `path` belongs to (its route's; OpenAI's under /v1/, else TEI's)."""
    tail = "/" + path.strip("/").split("/", 1)[-1] if path.count("/") > 1 and not path.startswith(("/v1/", "/v2/")) else path
    for route in TASK_ROUTES:
        if route.path in (path, tail):
            return route.errors
    return "openai" if path.startswith("/v1/") else "tei"


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 in the server's JSON error shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    error: BeiError
    if status == 404:
        error = RouteNotFoundError(f"no route {request.url.path}; see /openapi.json")
    elif status == 405:
        error = MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = BeiError(str(exc.detail) if isinstance(exc, HTTPException) else "internal error")
    response = error_response(error, style_of(request.url.path))
    response.status_code = status
    if isinstance(exc, HTTPException) and exc.headers:
        response.headers.update(exc.headers)
    return response


async def server_error(request: Request, exc: Exception) -> Response:
    """An unexpected error: logged with its traceback; the client reads no internals."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(BeiError("internal server error"), style_of(request.url.path))
