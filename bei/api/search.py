"""POST /v1/search: embed the query and the documents, keep the top_k by cosine, rerank them, in
one round trip. Needs an embedding model and (with `rerank: true`) a reranker served together."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from pydantic import Field, StrictBool

from bei.api.embeddings import dense_rows, finish
from bei.api.http import Timing
from bei.api.schemas import _Request
from bei.api.scoring import activate, check_count
from bei.inference import InferenceService
from bei.text.tokenizer import TextInput


class SearchRequest(_Request):
    query: str
    documents: list[str]
    top_k: int = Field(10, gt=0)
    rerank: StrictBool = True
    return_text: StrictBool = False
    embed_model: str | None = None
    rerank_model: str | None = None


async def search(
    embedder: InferenceService, reranker: InferenceService | None, request: SearchRequest, timing: Timing
) -> tuple[Any, dict[str, str]]:
    check_count(len(request.documents), embedder)
    started = time.perf_counter()
    items: list[TextInput] = [request.query, *request.documents]
    outcome = await embedder.run(items, truncate=True)
    timing.record(outcome)
    dense = dense_rows(embedder, outcome.rows)
    vectors = finish(dense, normalize=True, dimensions=None, full_dim=dense.shape[1])
    cosines = vectors[1:] @ vectors[0]
    candidates = [int(i) for i in np.argsort(-cosines, kind="stable")[: request.top_k]]
    embed_time = time.perf_counter() - started
    scores = {i: float(cosines[i]) for i in candidates}
    rerank_time = 0.0
    if reranker is not None and candidates:
        started = time.perf_counter()
        pairs: list[TextInput] = [(request.query, request.documents[i]) for i in candidates]
        ranked = await reranker.run(pairs, truncate=True)
        timing.record(ranked)
        probabilities = activate(np.stack(ranked.rows), raw=False)[:, 0]
        scores = {i: float(p) for i, p in zip(candidates, probabilities, strict=True)}
        rerank_time = time.perf_counter() - started
    order = sorted(candidates, key=lambda i: -scores[i])
    results = []
    for index in order:
        item: dict[str, Any] = {"index": index, "score": scores[index]}
        if request.return_text:
            item["text"] = request.documents[index]
        results.append(item)
    headers = {"x-embed-time": f"{embed_time * 1000:.3f}", "x-rerank-time": f"{rerank_time * 1000:.3f}"}
    return results, headers
