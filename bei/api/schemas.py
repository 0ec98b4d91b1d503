"""Wire schemas (pydantic) of the requests, and of the responses for /openapi.json.

Requests are validated with these models. Responses are built as plain JSON in the route modules;
the response models below only describe them in the OpenAPI schema (docs/api.md is the prose).
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired

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
    """/v1/embeddings (OpenAI) and /embeddings (Infinity, whose client sends `dimensions: 0` for "all")."""

    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=0)
    user: str | None = None


class EmbedRequest(_Request, TruncationMixin):
    """TEI's /embed."""

    inputs: EmbeddingInput
    normalize: StrictBool = True
    dimensions: int | None = Field(None, gt=0)
    prompt_name: str | None = None


class EmbedAllRequest(_Request, TruncationMixin):
    """TEI's /embed_all: per-token vectors (bge-m3's ColBERT vectors)."""

    inputs: EmbeddingInput
    prompt_name: str | None = None


class SimilarityInputs(BaseModel):
    source_sentence: str
    sentences: list[str]


class SimilarityRequest(_Request, TruncationMixin):
    """TEI's /similarity (huggingface_hub's `sentence_similarity`): the cosine of the source with each sentence."""

    inputs: SimilarityInputs
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


# huggingface_hub's InferenceClient sends options in `parameters`; they are read as top-level fields
# (bei/api/app.py), and a body with `parameters` is answered in the HF Inference API's shape
HFParameters = dict[str, Any] | None


class PredictRequest(_Request, TruncationMixin):
    inputs: PredictInput
    raw_scores: StrictBool = False
    top_k: int | None = Field(None, gt=0, description="keep the top_k labels of each input (all when null)")
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = Field(
        None, description="null: softmax over the labels (sigmoid for one label); none: the logits"
    )
    parameters: HFParameters = None


class PredictTokensRequest(_Request, TruncationMixin):
    inputs: PredictInput
    raw_scores: StrictBool = False
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "none"
    ignore_labels: list[str] | None = Field(None, description='labels left out of entities (default ["O"])')
    parameters: HFParameters = None


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
    id: str
    object: Literal["rerank"]
    model: str
    results: list[CohereRerankResult]
    usage: Usage
    meta: dict[str, Any]


class SimilarityResponse(RootModel[list[float]]):
    """The cosine of the source sentence with each sentence, in their order."""


class CohereEmbedResponse(BaseModel):
    """/v1/embed and /v2/embed: `embeddings` is `[[float]]` (v1 without embedding_types) or `{type: [[number]] | [str]}`."""

    id: str
    response_type: Literal["embeddings_floats", "embeddings_by_type"]
    embeddings: list[list[float]] | dict[str, list[list[float]] | list[str]]
    texts: list[str]
    meta: dict[str, Any]


class InfinityRerankResult(TypedDict):
    relevance_score: float
    index: int
    document: str | None


class InfinityRerankResponse(BaseModel):
    object: Literal["rerank"]
    results: list[InfinityRerankResult]
    model: str
    usage: Usage
    id: str
    created: int


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


class InfinityClassifyResponse(BaseModel):
    object: Literal["classify"]
    data: list[list[LabelScore]]
    model: str
    usage: Usage
    id: str
    created: int


class PredictTokensResponse(RootModel[list[TokenScores] | list[list[TokenScores]] | list[Entity] | list[list[Entity]]]):
    """Per token (`aggregation_strategy: none`) or entities; a list per input when `inputs` is a list."""


class SparseValue(TypedDict):
    index: int
    value: float


class SparseResponse(RootModel[list[list[SparseValue]]]):
    """The non-zero weights of each input, by vocabulary index."""


class EmbedAllResponse(RootModel[list[list[list[float]]]]):
    """Per input, one vector per token (bge-m3: the normalized ColBERT vector of every token after CLS)."""


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


class EmbeddingType(TypedDict):
    pooling: str | None


class ClassifierType(TypedDict):
    id2label: dict[str, str]
    label2id: dict[str, int]


class TargetSummary(TypedDict):
    name: str
    gpu: str | None
    device: str


class ModelInfo(BaseModel):
    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict[Literal["embedding"], EmbeddingType] | dict[Literal["reranker", "classifier"], ClassifierType]
    task: str
    pooling: list[str] | None
    labels: list[str] | None
    prompts: dict[str, str] | None
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
    """/info/models: every served model."""

    models: list[ModelInfo]
    version: str


class ModelCard(TypedDict):
    id: str
    object: Literal["model"]
    owned_by: Literal["infinity"]  # the one value Infinity's client takes; OpenAI's read any
    created: int
    task: str
    backend: str
    capabilities: list[str]
    stats: dict[str, Any]


class ModelResponse(RootModel[ModelCard]):
    """GET /v1/models/{id}."""


class ModelsResponse(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """TEI/BEI error body: TEI's and bei's routes, and `POST /`."""

    error: str
    error_type: str


class OpenAIErrorDetail(TypedDict):
    message: str
    type: str
    code: int


class OpenAIErrorBody(BaseModel):
    """OpenAI-style error body: /v1/embeddings, /embeddings, /classify, /v1/search, /v1/models/{id}."""

    error: OpenAIErrorDetail


class CohereErrorBody(BaseModel):
    """Cohere's error body: /v1/embed, /v2/embed, /v1/rerank, /v2/rerank."""

    message: str
    error_type: str
