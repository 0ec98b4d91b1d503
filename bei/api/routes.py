"""The table of task routes: path, the tasks that can serve it, its schema, its handler, its clients' error body.

Several routes may share a path (TEI's `/rerank` takes `texts`, Infinity's takes `documents`): a request
is answered by the first of them whose schema validates its body (`variants`). `POST /` is such a group
too: the default route of the first engine, then TEI's routes of its task (`root_variants`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from bei.api import cohere, embeddings, infinity, m3, scoring, sparse, tokenize, tokens
from bei.api.http import ErrorStyle, Timing
from bei.api.schemas import (
    CohereRerankRequest,
    EmbedAllRequest,
    EmbedRequest,
    OpenAIEmbeddingsRequest,
    PredictRequest,
    PredictTokensRequest,
    RerankRequest,
    SimilarityRequest,
    SparseRequest,
    TokenizeRequest,
)
from bei.inference import InferenceService
from bei.kinds import DENSE_TASKS, Task

Handler = Callable[[InferenceService, Any, Timing], Awaitable[Any]]

# what the 422 of an input over the model's limit tells the client to do, per route family
SET_TRUNCATE = "shorten it or set truncate: true"
NO_TRUNCATE_FIELD = "shorten it: this route has no truncate field (a server started with --auto-truncate cuts inputs to the limit)"
COHERE_TRUNCATE = 'shorten it or set truncate: "END" (or "START")'


@dataclass(frozen=True)
class TaskRoute:
    path: str
    tasks: frozenset[Task]
    request: type[BaseModel]
    handler: Handler
    summary: str
    errors: ErrorStyle = "tei"
    too_long: str = SET_TRUNCATE
    aliases: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path, *self.aliases)


EMBED = DENSE_TASKS
RERANK = frozenset({Task.RERANK})

TASK_ROUTES: tuple[TaskRoute, ...] = (
    TaskRoute(
        "/v1/embeddings",
        EMBED,
        OpenAIEmbeddingsRequest,
        embeddings.openai_embeddings,
        "OpenAI-compatible embeddings (also Infinity's /embeddings)",
        errors="openai",
        too_long=NO_TRUNCATE_FIELD,
        aliases=("/embeddings",),
    ),
    TaskRoute("/embed", EMBED, EmbedRequest, embeddings.tei_embed, "TEI-style embeddings"),
    TaskRoute("/similarity", EMBED, SimilarityRequest, embeddings.similarity, "TEI: cosine of a source sentence with each sentence"),
    TaskRoute("/v1/embed", EMBED, cohere.EmbedRequest, cohere.embed_v1, "Cohere v1 embed", errors="cohere", too_long=COHERE_TRUNCATE),
    TaskRoute("/v2/embed", EMBED, cohere.EmbedRequest, cohere.embed_v2, "Cohere v2 embed", errors="cohere", too_long=COHERE_TRUNCATE),
    TaskRoute(
        "/rerank",
        RERANK,
        RerankRequest,
        scoring.rerank,
        "cross-encoder scores of (query, text) pairs, in the order of the texts",
    ),
    TaskRoute(
        "/rerank",
        RERANK,
        infinity.RerankRequest,
        infinity.rerank,
        "Infinity's rerank (a body with `documents`): results sorted by relevance, cut to top_n",
    ),
    TaskRoute(
        "/v1/rerank",
        RERANK,
        CohereRerankRequest,
        scoring.cohere_rerank,
        "Cohere (v1, v2), Jina, vLLM rerank: results sorted by relevance, cut to top_n",
        errors="cohere",
        aliases=("/v2/rerank",),
    ),
    TaskRoute(
        "/predict",
        frozenset({Task.RERANK, Task.CLASSIFY}),
        PredictRequest,
        scoring.predict,
        "sequence classification of texts and pairs",
    ),
    TaskRoute(
        "/classify",
        frozenset({Task.CLASSIFY}),
        infinity.ClassifyRequest,
        infinity.classify,
        "Infinity's classify",
        errors="openai",
        aliases=("/v1/classify",),
    ),
    TaskRoute(
        "/predict_tokens",
        frozenset({Task.NER}),
        PredictTokensRequest,
        tokens.predict_tokens,
        "token classification (NER), per token or aggregated into entities",
    ),
    TaskRoute(
        "/embed_sparse",
        frozenset({Task.SPARSE, Task.EMBED_M3}),
        SparseRequest,
        sparse.embed_sparse,
        "sparse embeddings: SPLADE's, bge-m3's lexical weights",
    ),
    TaskRoute("/embed_all", frozenset({Task.EMBED_M3}), EmbedAllRequest, m3.embed_all, "TEI's per-token vectors: bge-m3's ColBERT vectors"),
    TaskRoute("/tokenize", frozenset(Task), TokenizeRequest, tokenize.tokenize, "token ids and offsets"),
)

# the route `/` stands for when the config names none
DEFAULT_ROUTE: dict[Task, str] = {
    Task.EMBED: "/v1/embeddings",
    Task.RERANK: "/rerank",
    Task.CLASSIFY: "/predict",
    Task.NER: "/predict_tokens",
    Task.SPARSE: "/embed_sparse",
    Task.EMBED_M3: "/v1/embeddings",
}
# after the default route, `POST /` takes TEI's bodies, as TEI's `/` does
ROOT_ROUTES = ("/embed", "/similarity", "/rerank", "/predict", "/predict_tokens", "/embed_sparse", "/embed_all")


def variants(path: str) -> list[TaskRoute]:
    """The routes served at `path`, in the order a body is tried against them."""
    return [route for route in TASK_ROUTES if path in route.paths]


def served_paths() -> list[str]:
    """Every POST path of the table, each once, in table order."""
    return list(dict.fromkeys(path for route in TASK_ROUTES for path in route.paths))


def root_variants(task: Task, default_path: str) -> list[TaskRoute]:
    ordered = [default_path, *ROOT_ROUTES]
    found = [route for path in dict.fromkeys(ordered) for route in variants(path) if task in route.tasks]
    return list(dict.fromkeys(found))


def routes_for(task: Task) -> list[str]:
    return list(dict.fromkeys(path for route in TASK_ROUTES if task in route.tasks for path in route.paths))
