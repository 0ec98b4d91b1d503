"""Wire schemas (pydantic) of the requests; responses are built as plain JSON in the route modules."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TokenIds = list[int]
EmbeddingInput = str | list[str] | TokenIds | list[TokenIds]


class _Request(BaseModel):
    # clients send fields of their own (`user`, `model`, Baseten's ids); unknown fields are ignored
    model_config = ConfigDict(extra="ignore")


def _direction(value: str) -> str:
    lowered = value.lower()
    if lowered not in ("right", "left"):
        raise ValueError(f"{value!r} is not one of Right, Left")
    return lowered


class TruncationMixin(BaseModel):
    truncate: bool | None = None
    truncation_direction: str = "right"

    _check_direction = field_validator("truncation_direction")(classmethod(lambda cls, v: _direction(v)))


class OpenAIEmbeddingsRequest(_Request):
    input: EmbeddingInput
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    user: str | None = None


class EmbedRequest(_Request, TruncationMixin):
    """TEI's /embed."""

    inputs: EmbeddingInput
    normalize: bool = True
    dimensions: int | None = Field(None, gt=0)
    prompt_name: str | None = None
