"""Infinity's routes, so that `infinity_client` works with its base URL at the root or at /v1:
/embeddings (the OpenAI route, bei/api/embeddings.py), /rerank with `documents`, /classify, /models.

Infinity's result objects: `{"object": "rerank" | "classify", "model", "usage", "id", "created", ...}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import Field

from bei.api.http import Timing
from bei.api.schemas import _Request
from bei.api.scoring import label_scores, ranked, served_name
from bei.inference import InferenceService
from bei.text.tokenizer import TextInput


class RerankRequest(_Request):
    """Infinity's /rerank: `documents` (TEI's /rerank takes `texts`)."""

    query: str
    documents: list[str]
    return_documents: bool = False
    raw_scores: bool = False
    top_n: int | None = Field(None, gt=0)


class ClassifyRequest(_Request):
    input: list[str] | str
    raw_scores: bool = False


def _result(kind: str, request: _Request, service: InferenceService, timing: Timing, **fields: Any) -> dict[str, Any]:
    return {
        "object": kind,
        **fields,
        "model": served_name(service, request.model),
        "usage": {"prompt_tokens": timing.compute_tokens, "total_tokens": timing.compute_tokens},
        "id": f"infinity-{uuid.uuid4()}",
        "created": int(time.time()),
    }


async def rerank(service: InferenceService, request: RerankRequest, timing: Timing) -> Any:
    best = await ranked(service, request.query, request.documents, raw=request.raw_scores, top_n=request.top_n, timing=timing)
    results = [
        {"relevance_score": score, "index": index, "document": request.documents[index] if request.return_documents else None}
        for index, score in best
    ]
    return _result("rerank", request, service, timing, results=results)


async def classify(service: InferenceService, request: ClassifyRequest, timing: Timing) -> Any:
    items: list[TextInput] = [request.input] if isinstance(request.input, str) else list(request.input)
    data = await label_scores(
        service,
        items,
        function="none" if request.raw_scores else None,
        top_k=None,
        truncate=True,  # Infinity truncates every input to the model's limit
        direction="right",
        timing=timing,
    )
    return _result("classify", request, service, timing, data=data)
