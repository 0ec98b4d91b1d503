"""POST /v1/search: embed the query and the documents, keep the top_k by cosine, rerank them, in
one round trip. Needs an embedding model and (with `rerank: true`) a reranker served together.

A corpus may be larger than one request's input cap (--max-client-batch-size): it is embedded in
chunks of that size, one after the other, so it never holds the engine's queue alone. A client that
searches one corpus many times sends its embeddings once computed (`document_embeddings`, e.g. from
/v1/embeddings of the same model): only the query is embedded then; their size must be the model's.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from pydantic import Field, StrictBool

from bei.api.embeddings import dense_rows, finish
from bei.api.http import Timing
from bei.api.schemas import _Request
from bei.api.scoring import activate
from bei.errors import EmptyInputError, ValidationError
from bei.inference import InferenceService
from bei.text.tokenizer import TextInput


class SearchRequest(_Request):
    query: str
    documents: list[str] | None = Field(None, description="the corpus's texts (needed to rerank and for return_text)")
    document_embeddings: list[list[float]] | None = Field(
        None, description="the corpus's embeddings by this embedding model, one per document: no document is embedded again"
    )
    top_k: int = Field(10, gt=0)
    rerank: StrictBool = True
    return_text: StrictBool = False
    embed_model: str | None = None
    rerank_model: str | None = None


def check_corpus(request: SearchRequest, dim: int) -> int:
    """The number of documents, before any engine call; 422 naming the field when the corpus is missing, empty, of two
    lengths, or of embeddings whose size is not the model's."""
    texts, vectors = request.documents, request.document_embeddings
    if texts is None and vectors is None:
        raise ValidationError("documents: send the corpus's texts, or its embeddings in `document_embeddings`, or both")
    if texts is not None and vectors is not None and len(texts) != len(vectors):
        raise ValidationError(f"document_embeddings: {len(vectors)} rows for {len(texts)} documents; send one per document, in order")
    count = len(texts) if texts is not None else len(vectors or [])
    if count == 0:
        raise EmptyInputError("documents: the corpus is empty: send at least one document")
    for i, row in enumerate(vectors or []):
        if len(row) != dim:
            raise ValidationError(
                f"document_embeddings[{i}]: {len(row)} numbers, but the embedding model's vectors have {dim}; "
                "embed the documents with the same model (without `dimensions`)"
            )
    if texts is None and (request.rerank or request.return_text):
        field = "rerank" if request.rerank else "return_text"
        raise ValidationError(f"{field}: needs the documents' text: send `documents` beside `document_embeddings`, or set {field}: false")
    return count


async def corpus_vectors(embedder: InferenceService, request: SearchRequest, timing: Timing) -> tuple[np.ndarray, np.ndarray]:
    """The query's embedding and the documents' (given, or embedded in chunks of the request cap)."""
    chunk = embedder.settings.max_client_batch_size
    texts = [] if request.document_embeddings is not None else request.documents or []
    rows: list[np.ndarray] = []
    for start in range(0, max(len(texts), 1), chunk):
        items: list[TextInput] = [*([request.query] if start == 0 else []), *texts[start : start + chunk]]
        outcome = await embedder.run(items, truncate=True)
        timing.record(outcome)
        rows += outcome.rows
    embedded = dense_rows(embedder, rows)
    full_dim = embedded.shape[1]
    if request.document_embeddings is not None:
        embedded = np.vstack([embedded, np.asarray(request.document_embeddings, dtype=np.float32)])
    vectors = finish(embedded, normalize=True, dimensions=None, full_dim=full_dim)
    return vectors[0], vectors[1:]


async def search(
    embedder: InferenceService, reranker: InferenceService | None, request: SearchRequest, timing: Timing
) -> tuple[Any, dict[str, str]]:
    started = time.perf_counter()
    query, documents = await corpus_vectors(embedder, request, timing)
    cosines = documents @ query
    candidates = [int(i) for i in np.argsort(-cosines, kind="stable")[: request.top_k]]
    embed_time = time.perf_counter() - started
    scores = {i: float(cosines[i]) for i in candidates}
    rerank_time = 0.0
    if reranker is not None and candidates and request.documents is not None:
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
        if request.return_text and request.documents is not None:
            item["text"] = request.documents[index]
        results.append(item)
    headers = {"x-embed-time": f"{embed_time * 1000:.3f}", "x-rerank-time": f"{rerank_time * 1000:.3f}"}
    return results, headers
