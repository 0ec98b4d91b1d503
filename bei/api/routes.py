"""The table of task routes: path, the tasks that can serve it, its schema and its handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from bei.api import embeddings
from bei.api.http import Timing
from bei.api.schemas import EmbedRequest, OpenAIEmbeddingsRequest
from bei.inference import InferenceService
from bei.modeling.spec import Task

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
