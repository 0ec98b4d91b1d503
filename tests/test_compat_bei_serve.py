"""The clients of tests/test_compat_clients.py against the session's real `bei serve` subprocess
(all-MiniLM-L6-v2, tests/conftest.py), as their READMEs call them, with sentence-transformers' numbers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from bei.testing.tiny_models import TEXTS
from tests.servers import MINILM_NAME, BuiltEngine, Server, assert_close_rows

ATOL = 1e-4


def st_vectors(st: Any, texts: list[str]) -> np.ndarray:
    return np.asarray(st.encode(texts, convert_to_numpy=True, batch_size=64), dtype=np.float64)  # MiniLM normalizes


@pytest.fixture(scope="module")
def h2c_server(minilm_build: BuiltEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`bei serve --http2` of the session's MiniLM engine: hypercorn, HTTP/1.1 and h2c on one port."""
    server = Server([str(minilm_build.engine_dir), "--http2", "--log-level", "warning"], tmp_path_factory.mktemp("h2c") / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(("server", "http_version"), [("uvicorn", 1), ("hypercorn", 1), ("hypercorn", 2)])
def test_baseten_performance_client(server: str, http_version: int, request: pytest.FixtureRequest, st_model: Any) -> None:
    """Baseten's client as its README calls it; `http_version=2` opens h2c with prior knowledge, which
    `bei serve --http2` answers (uvicorn, the default, speaks HTTP/1.1 only)."""
    from baseten_performance_client import PerformanceClient, RequestProcessingPreference

    base_url = request.getfixturevalue("minilm_server" if server == "uvicorn" else "h2c_server").base_url
    client = PerformanceClient(base_url=base_url, api_key="unused", http_version=http_version)
    texts = [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(100)]
    answer = client.embed(texts, model=MINILM_NAME, preference=RequestProcessingPreference(batch_size=16, max_concurrent_requests=8))
    assert_close_rows(answer.numpy(), st_vectors(st_model, texts), what=f"{server} over HTTP/{http_version}")


def test_huggingface_hub(minilm_server: Server, st_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite's offline mode would refuse 127.0.0.1 too
    client = InferenceClient(base_url=minilm_server.base_url)
    want = st_vectors(st_model, TEXTS[:8])
    assert_close_rows(client.feature_extraction(TEXTS[:8]), want, what="feature_extraction")
    similarities = client.sentence_similarity(TEXTS[0], TEXTS[1:8])
    np.testing.assert_allclose(similarities, want[1:] @ want[0], atol=ATOL)


def test_cohere(minilm_server: Server, st_model: Any) -> None:
    import cohere
    from sentence_transformers.quantization import quantize_embeddings

    v2 = cohere.ClientV2(base_url=minilm_server.base_url, api_key="unused")
    answer = v2.embed(texts=TEXTS[:8], model=MINILM_NAME, input_type="search_query", embedding_types=["float", "int8", "ubinary"])
    vectors = np.array(answer.embeddings.float_, dtype=np.float32)
    assert_close_rows(vectors, st_vectors(st_model, TEXTS[:8]), what="cohere v2 float")
    ranges = np.vstack([-np.ones(384), np.ones(384)])
    np.testing.assert_array_equal(answer.embeddings.int8, quantize_embeddings(vectors, precision="int8", ranges=ranges))
    np.testing.assert_array_equal(answer.embeddings.ubinary, quantize_embeddings(vectors, precision="ubinary"))
    assert np.array(answer.embeddings.ubinary).shape == (8, 384 // 8)
    many = [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(100)]
    v1 = cohere.Client(base_url=minilm_server.base_url, api_key="unused").embed(texts=many, model=MINILM_NAME)
    assert_close_rows(v1.embeddings, st_vectors(st_model, many), what="cohere v1 (the SDK sends 96 a request)")


def test_openai_300_inputs_and_retrieve(minilm_server: Server, st_model: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{minilm_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert client.models.retrieve(MINILM_NAME).id == MINILM_NAME
    texts = [TEXTS[i % len(TEXTS)] + f" ({i})" for i in range(300)]  # langchain's chunk of 300 was a 422 at a 128 cap
    answer = client.embeddings.create(input=texts, model=MINILM_NAME)
    assert_close_rows([d.embedding for d in answer.data], st_vectors(st_model, texts), what="300 inputs")


def test_infinity_embeddings(minilm_server: Server, st_model: Any) -> None:
    body = {"input": TEXTS[:4], "model": "default/not-specified", "dimensions": 0, "modality": "text"}  # infinity_client's body
    answer = httpx.post(f"{minilm_server.base_url}/embeddings", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert_close_rows([d["embedding"] for d in answer.json()["data"]], st_vectors(st_model, TEXTS[:4]), what="/embeddings")
    models = httpx.get(f"{minilm_server.base_url}/models", timeout=60).json()
    assert [(m["id"], m["stats"], m["owned_by"]) for m in models["data"]] == [(MINILM_NAME, {}, "infinity")]


def test_openapi_lists_the_compat_routes(minilm_server: Server) -> None:
    schema = httpx.get(f"{minilm_server.base_url}/openapi.json", timeout=60).json()
    for path in ("/similarity", "/v1/embed", "/v2/embed", "/v2/rerank", "/embeddings", "/classify", "/v1/classify"):
        assert "post" in schema["paths"][path], path
    for path in ("/info/models", "/models", "/v1/models/{model_id}", "/{model_name}/info"):
        assert "get" in schema["paths"][path], path
    # /rerank takes TEI's body or Infinity's; Cohere's routes answer errors in Cohere's body
    assert len(schema["paths"]["/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]["anyOf"]) == 2
    error = schema["paths"]["/v2/embed"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/CohereErrorBody"}


def test_langchain_openai_embeddings(minilm_server: Server, st_model: Any) -> None:
    """langchain's OpenAIEmbeddings with `check_embedding_ctx_length=False` sends the texts themselves."""
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=MINILM_NAME, base_url=f"{minilm_server.base_url}/v1", api_key="unused", check_embedding_ctx_length=False, max_retries=0
    )
    texts = [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(40)]
    assert_close_rows(embeddings.embed_documents(texts, chunk_size=16), st_vectors(st_model, texts), what="embed_documents")
    assert_close_rows([embeddings.embed_query(TEXTS[1])], st_vectors(st_model, [TEXTS[1]]), what="embed_query")


def test_langchain_default_token_ids_fail_loudly(minilm_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """langchain's defaults tokenize with tiktoken and send its ids, never the model's. tiktoken's cl100k
    file is downloaded at first use (not here, offline): a byte-level tiktoken encoding stands in for it.
    bei refuses ids that cannot be the model's tokenization (422), so langchain raises, never embeds wrong."""
    import openai
    import tiktoken
    from langchain_openai import OpenAIEmbeddings

    foreign = tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda _: foreign)
    embeddings = OpenAIEmbeddings(model=MINILM_NAME, base_url=f"{minilm_server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError, match="token") as raised:
        embeddings.embed_documents([TEXTS[1], TEXTS[3]])
    assert raised.value.status_code == 422
