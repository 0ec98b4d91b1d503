"""The table of task routes: path, the tasks that can serve it, its schema and its handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from bei.api import embeddings, scoring, sparse, tokenize, tokens
from bei.api.http import Timing
from bei.api.schemas import (
    CohereRerankRequest,
    EmbedRequest,
    OpenAIEmbeddingsRequest,
    PredictRequest,
    PredictTokensRequest,
    RerankRequest,
    SparseRequest,
    TokenizeRequest,
)
from bei.inference import InferenceService
from bei.kinds import Task

Handler = Callable[[InferenceService, Any, Timing], Awaitable[Any]]


@dataclass(frozen=True)
class TaskRoute:
    path: str
    tasks: frozenset[Task]
    request: type[BaseModel]
    handler: Handler
    summary: str


TASK_ROUTES: tuple[TaskRoute, ...] = (
    TaskRoute(
        "/v1/embeddings",
        frozenset({Task.EMBED}),
        OpenAIEmbeddingsRequest,
        embeddings.openai_embeddings,
        "OpenAI-compatible embeddings",
    ),
    TaskRoute("/embed", frozenset({Task.EMBED}), EmbedRequest, embeddings.tei_embed, "TEI-style embeddings"),
    TaskRoute(
        "/rerank",
        frozenset({Task.RERANK}),
        RerankRequest,
        scoring.rerank,
        "cross-encoder scores of (query, text) pairs, in the order of the texts",
    ),
    TaskRoute(
        "/v1/rerank",
        frozenset({Task.RERANK}),
        CohereRerankRequest,
        scoring.cohere_rerank,
        "Cohere/Jina-style rerank: results sorted by relevance, cut to top_n",
    ),
    TaskRoute(
        "/predict",
        frozenset({Task.RERANK, Task.CLASSIFY}),
        PredictRequest,
        scoring.predict,
        "sequence classification of texts and pairs",
    ),
    TaskRoute(
        "/predict_tokens",
        frozenset({Task.NER}),
        PredictTokensRequest,
        tokens.predict_tokens,
        "token classification (NER), per token or aggregated into entities",
    ),
    TaskRoute("/embed_sparse", frozenset({Task.SPARSE}), SparseRequest, sparse.embed_sparse, "SPLADE sparse embeddings"),
    TaskRoute("/tokenize", frozenset(Task), TokenizeRequest, tokenize.tokenize, "token ids and offsets"),
)

# the route `/` stands for when the config names none
DEFAULT_ROUTE: dict[Task, str] = {
    Task.EMBED: "/v1/embeddings",
    Task.RERANK: "/rerank",
    Task.CLASSIFY: "/predict",
    Task.NER: "/predict_tokens",
    Task.SPARSE: "/embed_sparse",
}


def routes_for(task: Task) -> list[str]:
    return [route.path for route in TASK_ROUTES if task in route.tasks]
