"""Constants and helpers of the client-compatibility tests (tests/test_compat_clients.py): the four tiny
BERT engines they serve (an embedder with query/document prompts, a reranker, a classifier, a NER model)
and the reference numbers of transformers on the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bei.testing.tiny_models import TEXTS

LIMIT = 24  # max_seq_len of every engine here: the too-long tests need short limits
PROMPTS = {"query": "query: ", "document": "passage: "}
ENGINES: dict[str, tuple[str, dict[str, Any]]] = {
    "embed": ("embed", {"prompts": PROMPTS}),
    "rerank": ("rerank", {}),
    "classify": ("classify", {"num_labels": 3}),
    "ner": ("ner", {}),
}
MAX_ABS_DIFF = 1e-4
QUERY = "What is the capital of France?"
SHORT = [t for t in TEXTS if len(t.split()) <= 8][:6]  # under LIMIT tokens, with or without a prompt


def st_encode(model: Any, texts: list[str], **kwargs: Any) -> np.ndarray:
    """sentence-transformers' unit vectors."""
    return np.asarray(model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, **kwargs), dtype=np.float64)


def unit(rows: Any) -> np.ndarray:
    """Rows scaled to length 1 (the tiny embedder has no Normalize module: OpenAI's route answers its raw vectors)."""
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def classifier_logits(checkpoint: Path, texts: list[str]) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.double().numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def long_text(words: int = 4 * LIMIT) -> str:
    return " ".join(["paris"] * words)


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, f"{response.request.url.path}: {response.status_code} {response.text}"
    return response.json()
