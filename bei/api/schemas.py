"""Wire schemas (pydantic) of the requests, and of the responses for /openapi.json.

Requests are validated with these models. Responses are built as plain JSON in the route modules;
the response models below only describe them in the OpenAPI schema (docs/api.md is the prose).
"""

from __future__ import annotations

from typing import Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool, StrictInt, field_validator
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from bei.text.tokenizer import Direction

TokenIds = list[StrictInt]
EmbeddingInput = str | list[str] | TokenIds | list[TokenIds]


class _Request(BaseModel):
    # clients send fields of their own (`user`, Baseten's ids); unknown fields are ignored
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="which served model answers (needed only where several fit)")


def _direction(value: object) -> object:
    """TEI spells the direction `Right` / `Left`; any case is taken."""
    if not isinstance(value, str):
        return value
    lowered = value.lower()
    if lowered not in ("right", "left"):
        raise ValueError(f"{value!r} is not one of Right, Left")
    return lowered


class TruncationMixin(BaseModel):
    truncate: StrictBool | None = None
    truncation_direction: Direction = "right"

    _check_direction = field_validator("truncation_direction", mode="before")(classmethod(lambda cls, v: _direction(v)))


class OpenAIEmbeddingsRequest(_Request):
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    user: str | None = None


class EmbedRequest(_Request, TruncationMixin):
    """TEI's /embed."""

    inputs: EmbeddingInput
    normalize: StrictBool = True
    dimensions: int | None = Field(None, gt=0)
    prompt_name: str | None = None


class RerankRequest(_Request, TruncationMixin):
    """BEI/TEI /rerank: scores in the order of `texts`."""

    query: str
    texts: list[str]
    raw_scores: StrictBool = False
    return_text: StrictBool = False


class CohereDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str


class CohereRerankRequest(_Request):
    """/v1/rerank (Cohere, Jina, Infinity, vLLM): results sorted by relevance, cut to top_n."""

    query: str
    documents: list[str | CohereDocument]
    top_n: int | None = Field(None, gt=0)
    return_documents: StrictBool = False


PredictInput = str | list[str] | list[list[str]]


class PredictRequest(_Request, TruncationMixin):
    inputs: PredictInput
    raw_scores: StrictBool = False


class PredictTokensRequest(_Request, TruncationMixin):
    inputs: PredictInput
    raw_scores: StrictBool = False
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "none"


class SparseRequest(_Request, TruncationMixin):
    inputs: str | list[str]


class TokenizeRequest(_Request):
    inputs: str | list[str]
    add_special_tokens: StrictBool = True
    prompt_name: str | None = None


# --- responses: documentation only (the route modules build these bodies as plain JSON) ------------
class Usage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbedding(TypedDict):
    object: Literal["embedding"]
    embedding: list[float] | str  # a base64 string of little-endian float32 with encoding_format "base64"
    index: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: Usage


class EmbedResponse(RootModel[list[list[float]]]):
    """One vector per input, in input order."""


class RerankResult(TypedDict):
    index: int
    score: float
    text: NotRequired[str]  # with return_text


class RerankResponse(RootModel[list[RerankResult]]):
    """One result per text, in the order of `texts`."""


class CohereRerankDocument(TypedDict):
    text: str


class CohereRerankResult(TypedDict):
    index: int
    relevance_score: float
    document: NotRequired[CohereRerankDocument]  # with return_documents


class CohereRerankResponse(BaseModel):
    object: Literal["list"]
    model: str
    results: list[CohereRerankResult]
    usage: Usage


class LabelScore(TypedDict):
    label: str
    score: float


class PredictResponse(RootModel[list[LabelScore] | list[list[LabelScore]]]):
    """Every label, best first; a list per input when `inputs` is a list."""


class TokenScores(TypedDict):
    token: str | None
    token_id: int
    start: int
    end: int
    results: dict[str, float]


class Entity(TypedDict):
    entity_group: str
    score: float
    word: str
    start: int
    end: int


class PredictTokensResponse(RootModel[list[TokenScores] | list[list[TokenScores]] | list[Entity] | list[list[Entity]]]):
    """Per token (`aggregation_strategy: none`) or entities; a list per input when `inputs` is a list."""


class SparseValue(TypedDict):
    index: int
    value: float


class SparseResponse(RootModel[list[list[SparseValue]]]):
    """The non-zero weights of each input, by vocabulary index."""


class Token(TypedDict):
    id: int
    text: str
    special: bool
    start: int
    stop: int


class TokenizeResponse(RootModel[list[list[Token]]]):
    """The tokens of each input."""


class SearchResult(TypedDict):
    index: int
    score: float
    text: NotRequired[str]  # with return_text


class SearchResponse(RootModel[list[SearchResult]]):
    """The top_k documents, best first."""


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ModelTypeInfo(TypedDict):
    pooling: list[str] | None
    labels: list[str] | None


class TargetSummary(TypedDict):
    name: str
    gpu: str | None
    device: str


class ModelInfo(BaseModel):
    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict[str, ModelTypeInfo]
    task: str
    architecture: str
    backend: str
    target: TargetSummary
    embedding_dim: int | None
    normalize: bool
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int
    max_client_batch_size: int
    max_concurrent_requests: int
    auto_truncate: bool
    tokenization_workers: int
    routes: list[str]
    version: str


class ModelsInfo(BaseModel):
    """/info when several engines are served."""

    models: list[ModelInfo]
    version: str


class InfoResponse(RootModel[ModelInfo | ModelsInfo]):
    """One model's info, or every model's when several are served."""


class ModelCard(TypedDict):
    id: str
    object: Literal["model"]
    owned_by: str
    created: int
    task: str


class ModelsResponse(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """TEI/BEI error body: every route outside /v1/."""

    error: str
    error_type: str


class OpenAIErrorDetail(TypedDict):
    message: str
    type: str
    code: int


class OpenAIErrorBody(BaseModel):
    """OpenAI-style error body: routes under /v1/."""

    error: OpenAIErrorDetail
