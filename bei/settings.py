"""`bei serve` settings, defined once: the CLI flags and BEI_* environment variables derive from here."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic import ValidationError as PydanticValidationError

from bei.errors import ConfigError

ENV_PREFIX = "BEI_"


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    max_batch_tokens: int | None = Field(None, gt=0, description="token budget of one engine call (default: the engine's max_num_tokens)")
    max_batch_requests: int | None = Field(None, gt=0, description="inputs in one engine call (default: the engine's max_batch_size)")
    max_client_batch_size: int = Field(2048, gt=0, description="inputs allowed in one request (OpenAI's limit)")
    max_concurrent_requests: int = Field(2048, gt=0, description="requests in flight before 429")
    payload_limit: int = Field(2_000_000, gt=0, description="request body limit in bytes (413 over it)")
    strict_token_ids: bool = Field(
        True,
        description="refuse token-id inputs that do not begin and end with the special tokens the model's tokenizer adds "
        "(ids of another tokenizer, e.g. tiktoken's from langchain's OpenAIEmbeddings, give wrong vectors)",
    )
    auto_truncate: bool = Field(False, description="truncate inputs over the model's limit instead of answering 422")
    tokenization_workers: int = Field(1, gt=0, description="threads that tokenize requests")
    engine_threads: int | None = Field(None, gt=0, description="threads of one engine call (default: all cores)")
    served_model_name: str | None = Field(None, description="model id reported by /info and /v1/models (default: the engine's name)")
    log_level: str = Field("info", description="uvicorn log level")
    api_key: SecretStr | None = Field(
        None, min_length=1, description="require `Authorization: Bearer <key>` on every route but /health (and /metrics)"
    )
    api_key_on_metrics: bool = Field(False, description="with --api-key: require the key on /metrics too")
    body_timeout: float = Field(30.0, gt=0, description="seconds a request body may take to arrive (408 after)")
    header_timeout: float = Field(10.0, gt=0, description="seconds a request line and headers may take to arrive (closed after)")
    http2: bool = Field(
        False,
        description="serve HTTP/2 cleartext (h2c, prior knowledge) beside HTTP/1.1 on the same port, with hypercorn instead of "
        "uvicorn (slower HTTP/1.1; every guard holds, but --header-timeout is also the idle keep-alive timeout and an HTTP/2 "
        "request refused before its body is read (401, 413) may stall its connection; docs/api.md)",
    )
    drain_timeout: float = Field(20.0, gt=0, le=600, description="seconds SIGTERM waits for requests in flight (503 after)")


def _base_type(annotation: Any) -> type:
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per setting, with the env var `BEI_<NAME>` as its default."""
    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        kind = _base_type(field.annotation)
        help_text = f"{field.description} [env {env}]"
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=str, default=None, help=help_text)


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServeSettings:
    """Flags first, then BEI_* env vars, then the defaults; errors name the flag."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, Any] = {}
    for name in ServeSettings.model_fields:
        value = getattr(args, name, None)
        if value is None:
            value = environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            values[name] = value
    try:
        return ServeSettings.model_validate(values)
    except PydanticValidationError as err:
        problems = []
        for e in err.errors():
            name = str(e["loc"][0])
            problems.append(f"--{name.replace('_', '-')} (env {ENV_PREFIX}{name.upper()}): {e['input']!r}: {e['msg']}")
        raise ConfigError("; ".join(problems)) from None


def engines_dir_default() -> Path:
    return Path(os.environ.get(ENV_PREFIX + "ENGINES_DIR", "engines"))
