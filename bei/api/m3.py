"""bge-m3 engines (task embed_m3): one per-token output per input, read three ways, as FlagEmbedding's
BGEM3FlagModel reads its model's outputs (bei/modeling/m3.py lays out the columns):

- dense:   the CLS row's hidden state (normalized where the checkpoint's modules.json says so),
           `dense_rows` in bei/api/embeddings.py, which every dense route reads;
- sparse:  each token's weight, the largest per token id, special tokens (CLS, EOS, pad, unk) and
           zero weights left out (`lexical_weights`), answered by /embed_sparse;
- ColBERT: the vectors of every token after CLS, normalized (`colbert_vectors`), answered by /embed_all.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bei.api.embeddings import as_inputs, prompt_text
from bei.api.http import Timing
from bei.api.schemas import EmbedAllRequest
from bei.inference import InferenceService
from bei.modeling.m3 import M3Columns
from bei.text.tokenizer import Encoded


def columns(service: InferenceService) -> M3Columns:
    manifest = service.engine.manifest
    return M3Columns(int(manifest.embedding_dim or 0), int(manifest.colbert_dim or 0))


def lexical_weights(service: InferenceService, encoded: Encoded, row: np.ndarray) -> list[tuple[int, float]]:
    """(token id, weight) by ascending id: each id's largest weight, special tokens and zeros left out."""
    tokenizer = service.tokenizer
    head, tail = tokenizer.frame
    unused = {*head, *tail, tokenizer.pad_id, tokenizer.unk_id}
    weights: dict[int, float] = {}
    for token, weight in zip(encoded.ids, row[:, columns(service).sparse].tolist(), strict=True):
        if token not in unused and weight > 0 and weight > weights.get(token, 0.0):
            weights[token] = weight
    return sorted(weights.items())


def colbert_vectors(service: InferenceService, row: np.ndarray) -> np.ndarray:
    """[tokens - 1, colbert_dim]: the normalized ColBERT vector of every token after CLS."""
    vectors = row[1:, columns(service).colbert].astype(np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


async def embed_all(service: InferenceService, request: EmbedAllRequest, timing: Timing) -> Any:
    """TEI's /embed_all shape, [input][token][dimension]: bge-m3's ColBERT multi-vectors."""
    items = as_inputs(request.inputs, service)
    outcome = await service.run(
        items, truncate=bool(request.truncate), direction=request.truncation_direction, prompt=prompt_text(service, request.prompt_name)
    )
    timing.record(outcome)
    return [colbert_vectors(service, row).tolist() for row in outcome.rows]
