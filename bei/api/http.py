"""One function per HTTP concern, shared by every route: parse a body, render errors, set headers.

JSON is parsed and rendered here only, with orjson: compact, UTF-8, the same values as `json`
(floats in their shortest round-trip form; numpy arrays as their own dtype's shortest form).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.responses import Response

from bei.errors import BeiError, PayloadTooLargeError, RequestTimeoutError, UnsupportedEncodingError, ValidationError, http_status
from bei.inference import Outcome

M = TypeVar("M", bound=BaseModel)

# the error body a route answers with: TEI's `{"error", "error_type"}`, OpenAI's `{"error": {...}}`,
# Cohere's `{"message"}`
ErrorStyle = Literal["tei", "openai", "cohere"]


def close_connection(response: Response, request: Request) -> None:
    """Ask an HTTP/1.x client not to reuse the connection (HTTP/2 has no `connection` header: the
    server's GOAWAY says it there)."""
    if str(request.scope.get("http_version", "1.1")).startswith("1"):
        response.headers["connection"] = "close"


async def read_json(request: Request, payload_limit: int) -> Any:
    """The request body as JSON: 413 over the limit (a gzip or deflate body: compressed, and once
    decompressed), 415 in another Content-Encoding, 422 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > payload_limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes is over the {payload_limit}-byte limit")
    decoder = BodyDecoder.for_encoding(request.headers.get("content-encoding"), payload_limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # a chunked body has no content-length: count as it comes
        size += len(chunk)
        if size > payload_limit:
            raise PayloadTooLargeError(f"request body is over the {payload_limit}-byte limit")
        chunks.append(decoder.feed(chunk) if decoder else chunk)
    if decoder:
        chunks.append(decoder.finish())
    body = b"".join(chunks)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise ValidationError(f"request body is not valid JSON: {err}") from None


class BodyDecoder:
    """Decompresses a gzip or deflate request body as it arrives, never past `limit` bytes: a small
    body that inflates past the payload limit (a gzip bomb) is refused with 413 before it does."""

    WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding
        self.limit = limit
        self.produced = 0
        self._inflate = zlib.decompressobj(self.WBITS[encoding])

    @classmethod
    def for_encoding(cls, header: str | None, limit: int) -> BodyDecoder | None:
        """None for an identity body; 415 for an encoding other than gzip and deflate (or a chain of them)."""
        encoding = (header or "identity").strip().lower()
        if encoding in ("", "identity"):
            return None
        if encoding not in cls.WBITS:
            raise UnsupportedEncodingError(f"Content-Encoding {header!r} is not supported: send the body as is, gzip or deflate")
        return cls(encoding, limit)

    def feed(self, data: bytes) -> bytes:
        pieces = []
        try:
            while data:
                piece = self._inflate.decompress(data, self.limit - self.produced + 1)
                self._count(piece)
                pieces.append(piece)
                data = self._inflate.unconsumed_tail
        except zlib.error as err:
            raise ValidationError(f"request body is not valid {self.encoding}: {err}") from None
        return b"".join(pieces)

    def finish(self) -> bytes:
        if not self._inflate.eof:
            raise ValidationError(f"request body is not valid {self.encoding}: the stream ends early")
        return b""

    def _count(self, piece: bytes) -> None:
        self.produced += len(piece)
        if self.produced > self.limit:
            raise PayloadTooLargeError(f"request body is over the {self.limit}-byte limit once decompressed ({self.encoding})")


async def read_json_within(request: Request, payload_limit: int, timeout: float) -> Any:
    """`read_json`, 408 when the body has not arrived within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            return await read_json(request, payload_limit)
    except TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {timeout:g} seconds") from None


def render_json(content: Any) -> bytes:
    """The one JSON renderer of every response body."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class JSONResponse(StarletteJSONResponse):
    """Starlette's JSONResponse, rendered by `render_json`."""

    def render(self, content: Any) -> bytes:
        return render_json(content)


def validate(model: type[M], data: Any) -> M:
    """JSON data as `model`; 422 naming each bad field."""
    try:
        return model.model_validate(data)
    except PydanticValidationError as err:
        raise ValidationError(describe_validation_error(err)) from None


def describe_validation_error(err: PydanticValidationError) -> str:
    problems = []
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"] if not str(part).startswith(("function-", "union[")))
        problems.append(f"{where or 'body'}: {e['msg']}")
    return "; ".join(dict.fromkeys(problems))


def error_body(error: BeiError, style: ErrorStyle) -> dict[str, Any]:
    """The error in the shape the route's clients parse (docs/api.md, "Errors")."""
    if style == "openai":
        return {"error": {"message": error.message, "type": error.error_type, "code": http_status(error)}}
    if style == "cohere":
        return {"message": error.message, "error_type": error.error_type}
    return {"error": error.message, "error_type": error.error_type}


def error_response(error: BeiError, style: ErrorStyle) -> JSONResponse:
    status = http_status(error)
    body = error_body(error, style)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class Timing:
    """Filled by a route, rendered as the x-* headers every response carries."""

    started: float = field(default_factory=time.perf_counter)
    compute_tokens: int = 0
    queue_time: float = 0.0
    inference_time: float = 0.0

    def record(self, outcome: Outcome) -> None:
        self.compute_tokens += outcome.tokens
        self.queue_time = max(self.queue_time, outcome.queue_time)
        self.inference_time += outcome.inference_time

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def headers(self) -> dict[str, str]:
        total = self.elapsed
        return {
            "x-compute-tokens": str(self.compute_tokens),
            "x-queue-time": f"{self.queue_time * 1000:.3f}",
            "x-inference-time": f"{self.inference_time * 1000:.3f}",
            "x-total-time": f"{total * 1000:.3f}",
        }


def json_response(payload: Any, timing: Timing) -> Response:
    return JSONResponse(payload, headers=timing.headers())
