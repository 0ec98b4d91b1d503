"""Wire schemas (pydantic) of the requests; responses are built as plain JSON in the route modules."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

TokenIds = list[StrictInt]
EmbeddingInput = str | list[str] | TokenIds | list[TokenIds]


class _Request(BaseModel):
    # clients send fields of their own (`user`, Baseten's ids); unknown fields are ignored
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="which served model answers (needed only where several fit)")


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
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    user: str | None = None


class EmbedRequest(_Request, TruncationMixin):
    """TEI's /embed."""

    inputs: EmbeddingInput
    normalize: bool = True
    dimensions: int | None = Field(None, gt=0)
    prompt_name: str | None = None


class RerankRequest(_Request, TruncationMixin):
    """BEI/TEI /rerank: scores in the order of `texts`."""

    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False


class CohereDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str


class CohereRerankRequest(_Request):
    """/v1/rerank (Cohere, Jina, Infinity, vLLM): results sorted by relevance, cut to top_n."""

    query: str
    documents: list[str | CohereDocument]
    top_n: int | None = Field(None, gt=0)
    return_documents: bool = False


PredictInput = str | list[str] | list[list[str]]


class PredictRequest(_Request, TruncationMixin):
    inputs: PredictInput
    raw_scores: bool = False


class PredictTokensRequest(_Request, TruncationMixin):
    inputs: PredictInput
    raw_scores: bool = False
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "none"


class SparseRequest(_Request, TruncationMixin):
    inputs: str | list[str]


class TokenizeRequest(_Request):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None
