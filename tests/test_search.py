"""POST /v1/search on a real `bei serve` of the session's MiniLM engine, against a cosine ranking
computed here from sentence-transformers: a corpus over the request cap (embedded in chunks inside
the server), precomputed document embeddings (nothing re-embedded), and clear 422s."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from bei.testing.tiny_models import TEXTS
from tests.servers import BuiltEngine, Server

CAP = 16  # --max-client-batch-size of this module's server: the corpus below is 4 requests' worth
WORDS = [w.strip(".,!?").lower() for text in TEXTS for w in text.split()]
CORPUS = [" ".join(random.Random(i).choices(WORDS, k=8)) for i in range(CAP * 3 + 5)]
QUERY = "the capital of France and its coffee"
TOP_K = 8
SCORE_ATOL = 1e-5


@pytest.fixture(scope="module")
def server(minilm_build: BuiltEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = [str(minilm_build.engine_dir), "--max-client-batch-size", str(CAP), "--log-level", "warning"]
    running = Server(args, tmp_path_factory.mktemp("search") / "serve.log").start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def reference(st_model: Any) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """sentence-transformers' document vectors, the query's cosines to them and the top TOP_K by cosine."""
    documents = np.asarray(st_model.encode(CORPUS, convert_to_numpy=True), dtype=np.float64)
    query = np.asarray(st_model.encode([QUERY], convert_to_numpy=True), dtype=np.float64)[0]
    cosines = documents @ query / (np.linalg.norm(documents, axis=1) * np.linalg.norm(query))
    ranked = [int(i) for i in np.argsort(-cosines, kind="stable")[:TOP_K]]
    gaps = -np.diff(np.sort(cosines)[::-1][: TOP_K + 1])
    assert np.all(gaps > 1e-4), f"near-tied cosines {gaps}: the order would not be a fair check"
    return documents, cosines, ranked


def search(server: Server, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/search", json={"query": QUERY, "top_k": TOP_K, "rerank": False, **body}, timeout=120)


def test_a_corpus_over_the_request_cap_is_embedded_in_chunks(server: Server, reference: tuple[np.ndarray, np.ndarray, list[int]]) -> None:
    _, cosines, ranked = reference
    capped = httpx.post(f"{server.base_url}/v1/embeddings", json={"input": CORPUS}, timeout=60)
    assert capped.status_code == 422, capped.text  # one request of the corpus is over the cap ...
    answer = search(server, documents=CORPUS, return_text=True)  # ... /v1/search takes it whole
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert [r["index"] for r in got] == ranked
    np.testing.assert_allclose([r["score"] for r in got], cosines[ranked], atol=SCORE_ATOL)
    assert [r["text"] for r in got] == [CORPUS[i] for i in ranked]


def test_precomputed_embeddings_are_not_embedded_again(server: Server, reference: tuple[np.ndarray, np.ndarray, list[int]]) -> None:
    documents, cosines, ranked = reference
    query_only = httpx.post(f"{server.base_url}/embed", json={"inputs": QUERY}, timeout=60)
    query_tokens = int(query_only.headers["x-compute-tokens"])
    # any scale: the server normalizes them for the cosine
    for rows in (documents, documents * 3.5):
        answer = search(server, document_embeddings=rows.tolist())
        assert answer.status_code == 200, answer.text
        assert [r["index"] for r in answer.json()] == ranked
        np.testing.assert_allclose([r["score"] for r in answer.json()], cosines[ranked], atol=SCORE_ATOL)
        assert int(answer.headers["x-compute-tokens"]) == query_tokens  # the query alone went through the engine
    both = search(server, documents=CORPUS, document_embeddings=documents.tolist(), return_text=True)
    assert both.status_code == 200, both.text
    assert [(r["index"], r["text"]) for r in both.json()] == [(i, CORPUS[i]) for i in ranked]
    assert int(both.headers["x-compute-tokens"]) == query_tokens


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"document_embeddings": [[0.1] * 384, [0.1] * 256]}, ["document_embeddings[1]", "256", "384"]),
        ({"documents": ["a", "b"], "document_embeddings": [[0.1] * 384]}, ["document_embeddings", "1 rows for 2 documents"]),
        ({}, ["documents", "document_embeddings"]),
        ({"document_embeddings": [[0.1] * 384], "rerank": True}, ["rerank", "documents"]),
        ({"document_embeddings": [[0.1] * 384], "return_text": True}, ["return_text", "documents"]),
        ({"documents": []}, ["documents", "empty"]),
        ({"document_embeddings": [["x"] * 384]}, ["document_embeddings.0.0"]),
    ],
)
def test_a_bad_corpus_is_a_clear_422(server: Server, body: dict[str, Any], words: list[str]) -> None:
    answer = search(server, **body)
    assert answer.status_code in (400, 422), answer.text
    message = answer.json()["error"]["message"]
    assert all(word in message for word in words), message
