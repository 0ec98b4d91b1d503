"""The clients people bring from TEI, Cohere, OpenAI and Infinity, unchanged, against bei's servers.

huggingface_hub's InferenceClient, cohere's ClientV2 and Client and openai's client are driven as their
users call them, against tiny engines served on 127.0.0.1 (tests/compat.py); their numbers are
compared with sentence-transformers and transformers on the same weights. infinity_client pins
httpx<0.28 (bei pins 0.28.1), so Infinity's routes are checked here against the fields its models'
`from_dict` require (infinity_client 0.0.78, `models/*.py`), with the exact bodies its `to_dict` sends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bei.testing.inproc_server import EngineBuilder, serve_engine
from tests.compat import (
    ENGINES,
    LIMIT,
    MAX_ABS_DIFF,
    QUERY,
    SHORT,
    classifier_logits,
    long_text,
    ok,
    softmax,
    st_encode,
    unit,
)


@pytest.fixture(scope="module")
def builder(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Iterator[EngineBuilder]:
    engines = EngineBuilder(tmp_path_factory.mktemp("compat"), workers=int(os.environ.get("BEI_TEST_BUILD_WORKERS", "2")))
    for name, (task, checkpoint) in ENGINES.items():
        engines.submit(f"compat-{name}", "bert", task, checkpoint, {"max_seq_len": LIMIT})
    try:
        yield engines
    finally:
        engines.close()


@pytest.fixture(scope="module")
def urls(builder: EngineBuilder) -> Iterator[dict[str, str]]:
    """The base URL of each engine's server, for the whole module."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(serve_engine(builder.get(f"compat-{name}")[1])) for name in ENGINES}


@pytest.fixture(scope="module")
def checkpoints(builder: EngineBuilder) -> dict[str, Path]:
    return {name: builder.get(f"compat-{name}")[0] for name in ENGINES}


@pytest.fixture(scope="module")
def st_model(checkpoints: dict[str, Path]) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(checkpoints["embed"]), device="cpu")
    model.max_seq_length = LIMIT  # the engines' limit: sentence-transformers truncates (right) where they do
    return model


@pytest.fixture(scope="module")
def cross_encoder(checkpoints: dict[str, Path]) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(checkpoints["rerank"]), device="cpu")


# --- TEI: huggingface_hub.InferenceClient(base_url=<root>) ---------------------------------------
@pytest.fixture()
def hf(monkeypatch: pytest.MonkeyPatch) -> Any:
    """InferenceClient for a base URL; HF_HUB_OFFLINE (set for the suite) would refuse even 127.0.0.1."""
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return lambda url: InferenceClient(base_url=url, token="unused")


def test_hf_feature_extraction_and_sentence_similarity(hf: Any, urls: dict[str, str], st_model: Any) -> None:
    client = hf(urls["embed"])
    want = st_encode(st_model, SHORT)
    np.testing.assert_allclose(client.feature_extraction(SHORT), want, atol=MAX_ABS_DIFF)
    one = client.feature_extraction(SHORT[0])
    assert one.shape == (1, want.shape[1])
    np.testing.assert_allclose(one[0], want[0], atol=MAX_ABS_DIFF)
    # options travel in `parameters`: prompt_name and truncate are honoured
    queried = client.feature_extraction(SHORT[:2], prompt_name="query")
    np.testing.assert_allclose(queried, st_encode(st_model, SHORT[:2], prompt_name="query"), atol=MAX_ABS_DIFF)
    assert client.feature_extraction(long_text(), truncate=True).shape == (1, want.shape[1])

    similarities = client.sentence_similarity(SHORT[0], SHORT[1:])
    np.testing.assert_allclose(similarities, want[1:] @ want[0], atol=MAX_ABS_DIFF)
    assert ok(httpx.post(f"{urls['embed']}/similarity", json={"inputs": {"source_sentence": SHORT[0], "sentences": SHORT[1:]}})) == (
        pytest.approx(similarities, abs=1e-6)
    )


def test_hf_text_classification_top_k(hf: Any, urls: dict[str, str], checkpoints: dict[str, Path]) -> None:
    client = hf(urls["classify"])
    logits = classifier_logits(checkpoints["classify"], [SHORT[2]])[0]
    labels = ["LABEL_A", "LABEL_B", "LABEL_C"]
    best = sorted(zip(labels, softmax(logits), strict=True), key=lambda pair: -pair[1])
    every = client.text_classification(SHORT[2])
    assert [e.label for e in every] == [label for label, _ in best]
    np.testing.assert_allclose([e.score for e in every], [score for _, score in best], atol=MAX_ABS_DIFF)
    two = client.text_classification(SHORT[2], top_k=2)
    assert [(e.label, round(e.score, 6)) for e in two] == [(e.label, round(e.score, 6)) for e in every[:2]]
    sigmoid = client.text_classification(SHORT[2], function_to_apply="sigmoid", top_k=1)
    top = int(np.argmax(logits))
    assert sigmoid[0].label == labels[top] and sigmoid[0].score == pytest.approx(1 / (1 + np.exp(-logits[top])), abs=MAX_ABS_DIFF)
    # TEI's own /predict keeps its shape (one list for one text), top_k there too
    assert len(ok(httpx.post(f"{urls['classify']}/predict", json={"inputs": SHORT[2], "top_k": 1}))) == 1


def test_hf_token_classification(hf: Any, urls: dict[str, str], checkpoints: dict[str, Path]) -> None:
    from transformers import pipeline

    client = hf(urls["ner"])
    reference = pipeline("token-classification", model=str(checkpoints["ner"]), device="cpu")
    for text in SHORT[:3]:
        for strategy in ("simple", "first", "max", "average"):
            got = client.token_classification(text, aggregation_strategy=strategy)
            want = reference(text, aggregation_strategy=strategy)
            assert [(e.entity_group, e.word, e.start, e.end) for e in got] == [
                (w["entity_group"], w["word"], w["start"], w["end"]) for w in want
            ], strategy
            np.testing.assert_allclose([e.score for e in got], [float(w["score"]) for w in want], atol=MAX_ABS_DIFF)
        # no strategy: the pipeline's per-token answer (entity, index), "O" left out
        got = client.token_classification(text)
        want = reference(text)
        assert [(e.entity, e.index, e.word, e.start, e.end) for e in got] == [
            (w["entity"], w["index"], w["word"], w["start"], w["end"]) for w in want
        ]
        np.testing.assert_allclose([e.score for e in got], [float(w["score"]) for w in want], atol=MAX_ABS_DIFF)


def test_root_takes_tei_bodies(urls: dict[str, str]) -> None:
    def both(name: str, body: dict[str, Any], route: str) -> None:
        assert ok(httpx.post(urls[name] + "/", json=body)) == ok(httpx.post(urls[name] + route, json=body)), (name, route)

    both("embed", {"inputs": SHORT[:2]}, "/embed")
    both("embed", {"input": SHORT[:2]}, "/v1/embeddings")  # the default route still answers its own body
    both("embed", {"inputs": {"source_sentence": SHORT[0], "sentences": SHORT[1:3]}}, "/similarity")
    both("rerank", {"query": QUERY, "texts": SHORT[:3]}, "/rerank")
    both("rerank", {"inputs": [[QUERY, SHORT[0]]]}, "/predict")
    both("classify", {"inputs": SHORT[:2]}, "/predict")
    both("ner", {"inputs": SHORT[:1], "aggregation_strategy": "simple"}, "/predict_tokens")
    missing = httpx.post(urls["embed"] + "/", json={"text": "x"})  # fits no route: the default route's 422
    assert missing.status_code == 422 and missing.json()["error"] == "input: Field required", missing.text


# --- Cohere: ClientV2 and Client ------------------------------------------------------------------
def test_cohere_v2_embed_types(urls: dict[str, str], st_model: Any) -> None:
    import cohere
    from sentence_transformers.quantization import quantize_embeddings

    client = cohere.ClientV2(base_url=urls["embed"], api_key="unused")
    kinds = ["float", "int8", "uint8", "binary", "ubinary"]
    answer = client.embed(texts=SHORT, model="any", input_type="search_document", embedding_types=kinds)
    vectors = np.array(answer.embeddings.float_, dtype=np.float32)
    np.testing.assert_allclose(vectors, st_encode(st_model, SHORT, prompt_name="document"), atol=MAX_ABS_DIFF)
    ranges = np.vstack([-np.ones(vectors.shape[1]), np.ones(vectors.shape[1])])
    for kind in kinds[1:]:
        want = quantize_embeddings(vectors, precision=kind, ranges=ranges)
        np.testing.assert_array_equal(np.array(getattr(answer.embeddings, kind)), want, err_msg=kind)
    # the other input types take the other prompt, or none
    query = client.embed(texts=SHORT[:2], model="any", input_type="search_query", embedding_types=["float"])
    np.testing.assert_allclose(query.embeddings.float_, st_encode(st_model, SHORT[:2], prompt_name="query"), atol=MAX_ABS_DIFF)
    plain = client.embed(texts=SHORT[:2], model="any", input_type="clustering", embedding_types=["float"])
    np.testing.assert_allclose(plain.embeddings.float_, st_encode(st_model, SHORT[:2]), atol=MAX_ABS_DIFF)
    assert answer.meta is not None and answer.meta.billed_units is not None and answer.meta.billed_units.input_tokens
    # v2's `inputs` (one text component each) embed as `texts` do; an image component, or a max_tokens under
    # the model's limit (bei truncates at the limit), is refused rather than ignored
    inputs = [cohere.EmbedInput(content=[cohere.TextEmbedContent(text=t)]) for t in SHORT[:2]]
    by_inputs = client.embed(inputs=inputs, model="any", input_type="search_query", embedding_types=["float"])
    np.testing.assert_allclose(by_inputs.embeddings.float_, query.embeddings.float_, atol=1e-6)
    assert by_inputs.texts == SHORT[:2]
    image = [cohere.EmbedInput(content=[cohere.ImageUrlEmbedContent(image_url={"url": "data:image/png;base64,AAAA"})])]
    with pytest.raises(cohere.errors.UnprocessableEntityError, match="bei embeds text"):
        client.embed(inputs=image, model="any", input_type="search_query", embedding_types=["float"])
    with pytest.raises(cohere.errors.UnprocessableEntityError, match=f"max_tokens: 5 is under the model's limit of {LIMIT}"):
        client.embed(texts=SHORT[:1], model="any", input_type="search_query", embedding_types=["float"], max_tokens=5)
    assert client.embed(texts=SHORT[:1], model="any", input_type="search_query", embedding_types=["float"], max_tokens=LIMIT).embeddings


def test_cohere_v1_embed_and_truncate(urls: dict[str, str], st_model: Any) -> None:
    import cohere

    client = cohere.Client(base_url=urls["embed"], api_key="unused")
    floats = client.embed(texts=SHORT, model="any", input_type="search_query")
    assert floats.response_type == "embeddings_floats"
    np.testing.assert_allclose(floats.embeddings, st_encode(st_model, SHORT, prompt_name="query"), atol=MAX_ABS_DIFF)
    by_type = client.embed(texts=SHORT[:2], model="any", input_type="search_query", embedding_types=["int8"])
    assert by_type.response_type == "embeddings_by_type" and len(by_type.embeddings.int8) == 2

    text = long_text()
    with pytest.raises(cohere.errors.UnprocessableEntityError) as refused:
        client.embed(texts=[text], model="any", input_type="clustering", truncate="NONE")
    message = refused.value.body["message"]
    assert f"limit of {LIMIT} tokens" in message and '"END"' in message and "truncate: true" not in message, message
    # END (Cohere's default) keeps the start, as sentence-transformers truncates; START keeps the end
    end = client.embed(texts=[text], model="any", input_type="clustering").embeddings
    np.testing.assert_allclose(end, st_encode(st_model, [text]), atol=MAX_ABS_DIFF)
    start = client.embed(texts=[text], model="any", input_type="clustering", truncate="START").embeddings
    left = ok(httpx.post(f"{urls['embed']}/embed", json={"inputs": [text], "truncate": True, "truncation_direction": "left"}))
    np.testing.assert_allclose(start, left, atol=1e-6)


def test_cohere_rerank_v1_and_v2(urls: dict[str, str], cross_encoder: Any) -> None:
    import cohere

    want = cross_encoder.predict([(QUERY, t) for t in SHORT])
    order = [int(i) for i in np.argsort(-want)]
    v2 = cohere.ClientV2(base_url=urls["rerank"], api_key="unused").rerank(model="any", query=QUERY, documents=SHORT, top_n=3)
    assert [r.index for r in v2.results] == order[:3]
    np.testing.assert_allclose([r.relevance_score for r in v2.results], want[order[:3]], atol=MAX_ABS_DIFF)
    v1 = cohere.Client(base_url=urls["rerank"], api_key="unused").rerank(
        model="any", query=QUERY, documents=SHORT, top_n=2, return_documents=True
    )
    assert [(r.index, r.document.text if r.document else None) for r in v1.results] == [(i, SHORT[i]) for i in order[:2]]
    with pytest.raises(cohere.errors.BadRequestError) as empty:
        cohere.ClientV2(base_url=urls["rerank"], api_key="unused").rerank(model="any", query=QUERY, documents=[])
    assert empty.value.body == {"message": "input is empty: send at least one text", "error_type": "empty"}


# --- OpenAI ---------------------------------------------------------------------------------------
def test_openai_models_retrieve_and_2048_inputs(urls: dict[str, str], st_model: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=urls["embed"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.retrieve("compat-embed")
    assert model.id == "compat-embed" and model.owned_by == "infinity"  # the value Infinity's client needs too
    assert [m.id for m in client.models.list()] == ["compat-embed"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    texts = [f"{SHORT[i % len(SHORT)]} {i}" for i in range(2048)]  # OpenAI's limit: one request, split by the batcher
    answer = client.embeddings.create(input=texts, model="any")
    assert [d.index for d in answer.data] == list(range(2048))
    picks = [0, 1, 777, 2047]
    np.testing.assert_allclose(
        unit([answer.data[i].embedding for i in picks]), st_encode(st_model, [texts[i] for i in picks]), atol=MAX_ABS_DIFF
    )
    with pytest.raises(openai.UnprocessableEntityError, match="2049 is over the maximum allowed batch size of 2048"):
        client.embeddings.create(input=[*texts, "one more"], model="any")


def test_long_input_messages_fit_the_route(urls: dict[str, str]) -> None:
    text = long_text()
    answers = {
        "/v1/embeddings": httpx.post(urls["embed"] + "/v1/embeddings", json={"input": text}),
        "/embed": httpx.post(urls["embed"] + "/embed", json={"inputs": text}),
        "/v2/embed": httpx.post(urls["embed"] + "/v2/embed", json={"texts": [text], "truncate": "NONE"}),
    }
    messages = {}
    for path, response in answers.items():
        assert response.status_code == 422, response.text
        body = response.json()
        messages[path] = body.get("message") or (body["error"]["message"] if isinstance(body["error"], dict) else body["error"])
        assert f"limit of {LIMIT} tokens" in messages[path], messages[path]
    assert "no truncate field" in messages["/v1/embeddings"] and "set truncate" not in messages["/v1/embeddings"]
    assert messages["/embed"].endswith("set truncate: true")
    assert '"END"' in messages["/v2/embed"]


def test_token_ids_of_another_tokenizer_are_refused(urls: dict[str, str], builder: Any, st_model: Any) -> None:
    own = list(st_model.tokenizer(SHORT[0])["input_ids"])
    inner = own[1:-1]  # valid ids of the vocabulary, without [CLS] ... [SEP]: as another tokenizer's ids look
    refused = httpx.post(urls["embed"] + "/v1/embeddings", json={"input": [own, inner]})
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    assert message.startswith("input.1: these token ids are not the model's tokenization") and "[CLS]" in message, message
    assert "check_embedding_ctx_length" in message
    accepted = ok(httpx.post(urls["embed"] + "/v1/embeddings", json={"input": [own]}))
    np.testing.assert_allclose(unit(accepted["data"][0]["embedding"]), st_encode(st_model, SHORT[:1])[0], atol=MAX_ABS_DIFF)
    with serve_engine(builder.get("compat-embed")[1], strict_token_ids=False) as lenient:
        assert len(ok(httpx.post(lenient + "/v1/embeddings", json={"input": [inner]}))["data"]) == 1


# --- Infinity: the bodies infinity_client sends, the fields its models require --------------------
def _check_usage(body: dict[str, Any]) -> None:
    assert isinstance(body["model"], str) and set(body["usage"]) >= {"prompt_tokens", "total_tokens"}


@pytest.mark.parametrize("base", ["", "/v1"])
def test_infinity_routes(urls: dict[str, str], base: str, st_model: Any, cross_encoder: Any, checkpoints: dict[str, Path]) -> None:
    # OpenAIEmbeddingInputText.to_dict(): model, dimensions 0 and modality are always sent
    body = {"input": SHORT[:3], "model": "default/not-specified", "dimensions": 0, "modality": "text"}
    embedded = ok(httpx.post(f"{urls['embed']}{base}/embeddings", json=body))
    _check_usage(embedded)
    assert embedded["object"] == "list" and all(d["object"] == "embedding" for d in embedded["data"])
    np.testing.assert_allclose(unit([d["embedding"] for d in embedded["data"]]), st_encode(st_model, SHORT[:3]), atol=MAX_ABS_DIFF)

    # RerankInput.to_dict(); ReRankResult needs results, model, usage and `object` "rerank" if present
    body = {"query": QUERY, "documents": SHORT, "return_documents": True, "raw_scores": False, "model": "default/not-specified", "top_n": 4}
    reranked = ok(httpx.post(f"{urls['rerank']}{base}/rerank", json=body))
    _check_usage(reranked)
    assert reranked["object"] == "rerank"
    want = cross_encoder.predict([(QUERY, t) for t in SHORT])
    order = [int(i) for i in np.argsort(-want)][:4]
    assert [r["index"] for r in reranked["results"]] == order
    np.testing.assert_allclose([r["relevance_score"] for r in reranked["results"]], want[order], atol=MAX_ABS_DIFF)
    if not base:  # Infinity's own: the document as a string (Cohere's /v1/rerank: {"text": ...})
        assert [r["document"] for r in reranked["results"]] == [SHORT[i] for i in order]
        # /rerank is TEI's with `texts`, Infinity's with `documents`: a 422 speaks of the body that was meant
        wrong = httpx.post(f"{urls['rerank']}/rerank", json={**body, "top_n": 0})
        assert wrong.status_code == 422 and wrong.json()["error"].startswith("top_n:"), wrong.text

    # ClassifyInput.to_dict(); ClassifyResult needs data [[{score, label}]], model, usage, `object` "classify"
    classified = ok(
        httpx.post(f"{urls['classify']}{base}/classify", json={"input": SHORT[:2], "model": "default/not-specified", "raw_scores": False})
    )
    _check_usage(classified)
    assert classified["object"] == "classify"
    probabilities = softmax(classifier_logits(checkpoints["classify"], SHORT[:2]))
    for row, want_row in zip(classified["data"], probabilities, strict=True):
        assert [r["score"] for r in row] == sorted((r["score"] for r in row), reverse=True)
        np.testing.assert_allclose(sorted(r["score"] for r in row), sorted(want_row), atol=MAX_ABS_DIFF)


@pytest.mark.parametrize("base", ["", "/v1"])
def test_infinity_models(urls: dict[str, str], base: str) -> None:
    # OpenAIModelInfo: data [ModelInfo]; ModelInfo needs id and stats, and refuses an owned_by other than "infinity"
    # (at the root and at /v1); OpenAI's Model needs id, object, created, owned_by (a string)
    listed = ok(httpx.get(urls["rerank"] + base + "/models"))
    assert listed["object"] == "list"
    [card] = listed["data"]
    assert card["id"] == "compat-rerank" and card["stats"] == {} and card["object"] == "model"
    assert card["owned_by"] == "infinity" and card["created"] == 0 and card["capabilities"] == ["rerank"]
