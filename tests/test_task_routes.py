"""Task routes of served engines: wrong routes, the default route, /tokenize, truncation, empty
inputs, /info; and the build-time errors of checkpoints bei cannot serve.

Four tiny BERT engines (reranker, classifier, NER, embedder) are built once for the module and each
is served in this process (bei/testing/inproc_server.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from bei.build import build_engine
from bei.config import parse_config
from bei.errors import ModelError
from bei.modeling.detect import ARCHITECTURES, read_model_spec
from bei.progress import Progress
from bei.testing.inproc_server import EngineBuilder, config_for, serve_engine
from bei.testing.tiny_models import TEXTS

LIMIT = 24  # trt_llm.build.max_seq_len of the reranker and the classifier
MAX_ABS_DIFF = 1e-4
QUERY = "What is the capital of France?"

ENGINES: dict[str, tuple[str, dict[str, Any]]] = {
    "rerank": ("rerank", {"max_seq_len": LIMIT, "default_route": "/predict"}),
    "classify": ("classify", {"max_seq_len": LIMIT}),
    "ner": ("ner", {}),
    "embed": ("embed", {}),
}


@pytest.fixture(scope="module")
def builder(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Iterator[EngineBuilder]:
    """The engines, built ahead; the tiny reference models run on one torch thread (the build workers need the cores)."""
    engines = EngineBuilder(tmp_path_factory.mktemp("routes"), workers=int(os.environ.get("BEI_TEST_BUILD_WORKERS", "2")))
    for name, (task, build) in ENGINES.items():
        engines.submit(f"bert-{name}", "bert", task, {"num_labels": 3} if task == "classify" else {}, build)
    try:
        yield engines
    finally:
        engines.close()


@pytest.fixture(scope="module")
def servers(builder: EngineBuilder) -> Iterator[dict[str, httpx.Client]]:
    """One client per engine, each engine served in this process for the whole module."""
    with contextlib.ExitStack() as stack:
        clients = {}
        for name in ENGINES:
            base_url = stack.enter_context(serve_engine(builder.get(f"bert-{name}")[1]))
            clients[name] = stack.enter_context(httpx.Client(base_url=base_url, timeout=60.0))
        yield clients


@pytest.fixture(scope="module")
def checkpoints(builder: EngineBuilder) -> dict[str, Path]:
    return {name: builder.get(f"bert-{name}")[0] for name in ENGINES}


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, f"{response.request.url.path}: {response.status_code} {response.text}"
    return response.json()


def error_message(response: httpx.Response) -> str:
    body = response.json()
    if "error" not in body:  # Cohere's shape
        return str(body["message"])
    return body["error"]["message"] if isinstance(body["error"], dict) else body["error"]


# --- wrong routes -----------------------------------------------------------------------------
WRONG_ROUTES = [
    ("embed", "/rerank", {"query": QUERY, "texts": ["a"]}, ["/v1/embeddings", "/embed"]),
    ("embed", "/predict", {"inputs": ["a"]}, ["/v1/embeddings", "/embed"]),
    ("rerank", "/v1/embeddings", {"input": ["a"]}, ["/rerank", "/v1/rerank", "/predict"]),
    ("rerank", "/predict_tokens", {"inputs": ["a"]}, ["/rerank", "/v1/rerank", "/predict"]),
    ("classify", "/rerank", {"query": QUERY, "texts": ["a"]}, ["/predict"]),
    ("classify", "/v1/rerank", {"query": QUERY, "documents": ["a"]}, ["/predict"]),
    ("classify", "/v2/rerank", {"query": QUERY, "documents": ["a"]}, ["/predict"]),
    ("rerank", "/v2/embed", {"texts": ["a"]}, ["/rerank", "/v1/rerank", "/predict"]),
    ("ner", "/predict", {"inputs": ["a"]}, ["/predict_tokens"]),
    ("ner", "/embed_sparse", {"inputs": ["a"]}, ["/predict_tokens"]),
]


@pytest.mark.parametrize(("engine", "path", "body", "fits"), WRONG_ROUTES, ids=lambda v: v if isinstance(v, str) else "")
def test_wrong_route_names_the_routes_that_fit(
    servers: dict[str, httpx.Client], engine: str, path: str, body: dict[str, Any], fits: list[str]
) -> None:
    response = servers[engine].post(path, json=body)
    assert response.status_code == 400, response.text
    message = error_message(response)
    for route in fits:
        assert route in message, f"{path} on {engine}: {message!r} does not name {route}"
    assert path in message
    if path in ("/v1/embeddings", "/embeddings", "/classify"):
        # OpenAI's error shape on OpenAI's and Infinity's routes
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "code"} and error["code"] == 400 and error["type"] == "wrong_route"
    elif path.startswith(("/v1/", "/v2/")):  # Cohere's
        assert response.json() == {"message": message, "error_type": "wrong_route"}
    else:
        assert response.json() == {"error": message, "error_type": "wrong_route"}


# --- default route, /info ---------------------------------------------------------------------
def test_default_route_from_the_config(servers: dict[str, httpx.Client]) -> None:
    # the reranker's config names /predict: POST / answers as /predict does
    body = {"inputs": [[QUERY, TEXTS[0]], [QUERY, TEXTS[9]]], "raw_scores": True}
    assert ok(servers["rerank"].post("/", json=body)) == ok(servers["rerank"].post("/predict", json=body))
    # no default route configured: the task's own (/v1/embeddings, /predict_tokens, /predict)
    embedded = ok(servers["embed"].post("/", json={"input": TEXTS[:2], "encoding_format": "float"}))
    assert embedded["object"] == "list" and len(embedded["data"]) == 2
    assert embedded["data"] == ok(servers["embed"].post("/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "float"}))["data"]
    assert ok(servers["ner"].post("/", json={"inputs": [TEXTS[3]]})) == ok(
        servers["ner"].post("/predict_tokens", json={"inputs": [TEXTS[3]]})
    )
    assert ok(servers["classify"].post("/", json={"inputs": [TEXTS[2]]})) == ok(
        servers["classify"].post("/predict", json={"inputs": [TEXTS[2]]})
    )


def test_info_reports_the_task(servers: dict[str, httpx.Client]) -> None:
    routes = {
        "rerank": ["/rerank", "/v1/rerank", "/v2/rerank", "/predict", "/tokenize"],
        "classify": ["/predict", "/classify", "/v1/classify", "/tokenize"],
        "ner": ["/predict_tokens", "/tokenize"],
        "embed": ["/v1/embeddings", "/embeddings", "/embed", "/similarity", "/v1/embed", "/v2/embed", "/tokenize"],
    }
    tei_model_type = {"rerank": "reranker", "classify": "classifier", "ner": "classifier", "embed": "embedding"}
    for name, client in servers.items():
        info = ok(client.get("/info"))
        assert info["task"] == name
        assert list(info["model_type"]) == [tei_model_type[name]]  # TEI's key
        assert info["routes"] == routes[name]
        assert ok(client.get("/info/models"))["models"] == [info]
        # max_seq_len of the config; else sentence_bert_config.json's max_seq_length (64); else positions
        assert info["max_input_length"] == {"rerank": LIMIT, "classify": LIMIT, "embed": 64, "ner": 128}[name]
    classifier = ok(servers["classify"].get("/info"))["model_type"]["classifier"]
    assert classifier == {
        "id2label": {"0": "LABEL_A", "1": "LABEL_B", "2": "LABEL_C"},
        "label2id": {"LABEL_A": 0, "LABEL_B": 1, "LABEL_C": 2},
    }
    assert ok(servers["embed"].get("/info"))["model_type"] == {"embedding": {"pooling": "mean"}}
    assert ok(servers["embed"].get("/info"))["embedding_dim"] == 32


# --- /tokenize --------------------------------------------------------------------------------
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenize_matches_the_tokenizer(servers: dict[str, httpx.Client], checkpoints: dict[str, Path], add_special_tokens: bool) -> None:
    from tokenizers import Tokenizer

    for name in ("embed", "rerank"):
        tokenizer = Tokenizer.from_file(str(checkpoints[name] / "tokenizer.json"))
        texts = TEXTS[:6]
        answer = ok(servers[name].post("/tokenize", json={"inputs": texts, "add_special_tokens": add_special_tokens}))
        assert len(answer) == len(texts)
        for text, tokens in zip(texts, answer, strict=False):
            enc = tokenizer.encode(text, add_special_tokens=add_special_tokens)
            assert [t["id"] for t in tokens] == enc.ids
            assert [(t["start"], t["stop"]) for t in tokens] == [tuple(o) for o in enc.offsets]
            assert [t["special"] for t in tokens] == [bool(s) for s in enc.special_tokens_mask]
            assert any(t["special"] for t in tokens) == add_special_tokens
            for token, piece, special, (start, stop) in zip(tokens, enc.tokens, enc.special_tokens_mask, enc.offsets, strict=False):
                assert token["text"] == (piece if special else text[start:stop])
    single = ok(servers["ner"].post("/tokenize", json={"inputs": TEXTS[1]}))
    assert len(single) == 1 and single[0][0]["special"] and single[0][0]["text"] == "[CLS]"


# --- truncation -------------------------------------------------------------------------------
def _single_token_words(checkpoint: Path) -> list[str]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    words = []
    for text in TEXTS:
        for word in text.lower().split():
            word = word.strip(".,!?;:\"'()-")
            if word.isalpha() and word not in words and len(tokenizer.encode(word, add_special_tokens=False).ids) == 1:
                words.append(word)
    assert len(words) >= 20
    return words


def _text_of(checkpoint: Path, tokens: int, query: str | None = None) -> str:
    """A text that tokenizes (alone, or as the pair (query, text)) into exactly `tokens` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    words = _single_token_words(checkpoint)
    for count in range(1, 4 * tokens):
        text = " ".join(words[i % len(words)] for i in range(count))
        enc = tokenizer.encode(query, text) if query is not None else tokenizer.encode(text)
        if len(enc.ids) == tokens:
            return text
    raise AssertionError(f"no text of {tokens} tokens")


def _reference_logits(checkpoint: Path, items: list[Any], direction: str) -> np.ndarray:
    """AutoModelForSequenceClassification on texts or pairs truncated to LIMIT tokens from `direction`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    tokenizer.truncation_side = direction
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    if isinstance(items[0], tuple):
        batch = tokenizer(
            [a for a, _ in items], [b for _, b in items], padding=True, truncation=True, max_length=LIMIT, return_tensors="pt"
        )
    else:
        batch = tokenizer(items, padding=True, truncation=True, max_length=LIMIT, return_tensors="pt")
    assert batch["input_ids"].shape[1] == LIMIT
    with torch.no_grad():
        return model(**batch).logits.double().numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _assert_too_long(response: httpx.Response, over: int) -> None:
    assert response.status_code == 422, response.text
    message = error_message(response)
    assert f"{over} tokens" in message and f"{LIMIT} tokens" in message, message
    assert "truncate" in message


def test_rerank_truncation(servers: dict[str, httpx.Client], checkpoints: dict[str, Path]) -> None:
    client, checkpoint = servers["rerank"], checkpoints["rerank"]
    at_limit = _text_of(checkpoint, LIMIT, query=QUERY)
    over = _text_of(checkpoint, LIMIT + 1, query=QUERY)
    longer = _text_of(checkpoint, LIMIT + 9, query=QUERY)
    ok(client.post("/rerank", json={"query": QUERY, "texts": [at_limit]}))
    _assert_too_long(client.post("/rerank", json={"query": QUERY, "texts": [at_limit, over]}), LIMIT + 1)
    _assert_too_long(client.post("/predict", json={"inputs": [[QUERY, over]]}), LIMIT + 1)
    texts = [over, longer, at_limit]
    for direction in ("right", "left"):
        logits = _reference_logits(checkpoint, [(QUERY, t) for t in texts], direction)
        body = {"query": QUERY, "texts": texts, "truncate": True, "truncation_direction": direction.capitalize(), "raw_scores": True}
        raw = ok(client.post("/rerank", json=body))
        np.testing.assert_allclose([r["score"] for r in raw], logits[:, 0], atol=MAX_ABS_DIFF, err_msg=direction)
        scores = ok(client.post("/rerank", json={**body, "raw_scores": False}))
        np.testing.assert_allclose([r["score"] for r in scores], 1 / (1 + np.exp(-logits[:, 0])), atol=MAX_ABS_DIFF)
        pairs = ok(
            client.post(
                "/predict",
                json={"inputs": [[QUERY, t] for t in texts], "truncate": True, "truncation_direction": direction, "raw_scores": True},
            )
        )
        np.testing.assert_allclose([p[0]["score"] for p in pairs], logits[:, 0], atol=MAX_ABS_DIFF, err_msg=direction)
    # /v1/rerank truncates documents over the limit, as Cohere, Jina and Infinity do
    cohere = ok(client.post("/v1/rerank", json={"query": QUERY, "documents": texts}))
    assert sorted(r["index"] for r in cohere["results"]) == [0, 1, 2]


def test_predict_truncation(servers: dict[str, httpx.Client], checkpoints: dict[str, Path]) -> None:
    from tokenizers import Tokenizer

    client, checkpoint = servers["classify"], checkpoints["classify"]
    at_limit = _text_of(checkpoint, LIMIT)
    over = _text_of(checkpoint, LIMIT + 1)
    longer = _text_of(checkpoint, LIMIT + 12)
    ok(client.post("/predict", json={"inputs": [at_limit]}))
    ok(client.post("/predict", json={"inputs": [[at_limit]]}))
    _assert_too_long(client.post("/predict", json={"inputs": [at_limit, over]}), LIMIT + 1)
    pair_length = len(Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(TEXTS[0], over).ids)
    _assert_too_long(client.post("/predict", json={"inputs": [[TEXTS[0], over]]}), pair_length)
    texts = [over, longer]
    references = {}
    for direction in ("right", "left"):
        logits = _reference_logits(checkpoint, texts, direction)
        references[direction] = logits
        for raw_scores, want in ((True, logits), (False, _softmax(logits))):
            answer = ok(
                client.post(
                    "/predict", json={"inputs": texts, "truncate": True, "truncation_direction": direction, "raw_scores": raw_scores}
                )
            )
            for row, expected in zip(answer, want, strict=False):
                got = {r["label"]: r["score"] for r in row}
                np.testing.assert_allclose(
                    [got[f"LABEL_{c}"] for c in "ABC"], expected, atol=MAX_ABS_DIFF, err_msg=f"{direction} raw_scores={raw_scores}"
                )
    # the two directions keep different tokens of `longer`: the engine followed the one asked for
    assert np.abs(references["right"][1] - references["left"][1]).max() > 10 * MAX_ABS_DIFF


def test_ner_and_embed_too_long(servers: dict[str, httpx.Client], checkpoints: dict[str, Path]) -> None:
    text = " ".join(_single_token_words(checkpoints["ner"]) * 8)
    response = servers["ner"].post("/predict_tokens", json={"inputs": [text]})
    assert response.status_code == 422 and "limit of 128 tokens" in error_message(response)
    tokens = ok(servers["ner"].post("/predict_tokens", json={"inputs": [text], "truncate": True}))[0]
    assert len(tokens) == 128 - 2
    response = servers["embed"].post("/v1/embeddings", json={"input": [text]})
    assert response.status_code == 422 and "limit of 64 tokens" in response.json()["error"]["message"]
    assert len(ok(servers["embed"].post("/embed", json={"inputs": [text], "truncate": True}))[0]) == 32


# --- invalid inputs ---------------------------------------------------------------------------
EMPTY = [
    ("rerank", "/rerank", {"query": QUERY, "texts": []}),
    ("rerank", "/v1/rerank", {"query": QUERY, "documents": []}),
    ("rerank", "/predict", {"inputs": []}),
    ("classify", "/predict", {"inputs": []}),
    ("classify", "/predict", {"inputs": [""]}),
    ("ner", "/predict_tokens", {"inputs": []}),
    ("embed", "/v1/embeddings", {"input": []}),
    ("embed", "/embed", {"inputs": []}),
    ("embed", "/embed", {"inputs": ""}),
]


@pytest.mark.parametrize(("engine", "path", "body"), EMPTY, ids=lambda v: v if isinstance(v, str) else "")
def test_empty_input_is_400(servers: dict[str, httpx.Client], engine: str, path: str, body: dict[str, Any]) -> None:
    response = servers[engine].post(path, json=body)
    assert response.status_code == 400, response.text
    assert "empty" in error_message(response)


def test_three_strings_in_an_inner_list_is_422(servers: dict[str, httpx.Client]) -> None:
    for engine in ("classify", "rerank"):
        response = servers[engine].post("/predict", json={"inputs": [["a"], ["a", "b", "c"]]})
        assert response.status_code == 422, response.text
        assert "inputs.1" in error_message(response) and "3 strings" in error_message(response)
    response = servers["ner"].post("/predict_tokens", json={"inputs": [["a", "b"]]})
    assert response.status_code == 422 and "pairs" in error_message(response)


# --- build-time errors ------------------------------------------------------------------------
def _build(tmp_path: Path, checkpoint: Path, base_model: str) -> None:
    config = parse_config(config_for("broken", checkpoint, base_model))
    build_engine(config, config_dir=tmp_path, engines_root=tmp_path / "engines", progress=Progress([], enabled=False))


def _edited_copy(checkpoint: Path, tmp_path: Path, edit: Any) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _drop_labels(config: dict[str, Any]) -> None:
    config.pop("id2label")
    config.pop("label2id", None)


def test_classifier_without_id2label_fails_to_build(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = _edited_copy(checkpoints["classify"], tmp_path, _drop_labels)
    with pytest.raises(ModelError, match="id2label is required"):
        _build(tmp_path, folder, "encoder_bert")
    assert not (tmp_path / "engines" / "broken").exists()


def _labels(id2label: Any) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["id2label"] = id2label
        config.pop("label2id", None)

    return edit


def test_id2label_rule(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """id2label is required: a mapping that names every output of the head, indices 0..n-1.

    The names transformers writes for a head nobody named (LABEL_0, ...) are accepted: TEI and the
    transformers pipelines accept them, and real classifiers ship them.
    """
    default = _edited_copy(checkpoints["classify"], tmp_path / "default", _labels({"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}))
    assert read_model_spec(default).labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    unordered = _edited_copy(checkpoints["classify"], tmp_path / "unordered", _labels({"2": "c", "0": "a", "1": "b"}))
    assert read_model_spec(unordered).labels == ("a", "b", "c")
    bad = {
        "missing": _drop_labels,
        "empty": _labels({}),
        "gap": _labels({"0": "a", "2": "c", "3": "d"}),
        "not-an-index": _labels({"0": "a", "one": "b", "2": "c"}),
        "a-list": _labels(["a", "b", "c"]),
    }
    for name, edit in bad.items():
        folder = _edited_copy(checkpoints["classify"], tmp_path / name, edit)
        with pytest.raises(ModelError, match="id2label"):
            read_model_spec(folder)
    # NER heads need names as well
    folder = _edited_copy(checkpoints["ner"], tmp_path / "ner", _drop_labels)
    with pytest.raises(ModelError, match="id2label is required"):
        read_model_spec(folder)

    # a reranker (one output, num_labels 1) needs no name
    def one_output(config: dict[str, Any]) -> None:
        _drop_labels(config)
        config["num_labels"] = 1

    spec = read_model_spec(_edited_copy(checkpoints["rerank"], tmp_path / "rerank", one_output))
    assert spec.task.value == "rerank" and spec.labels == ("score",)


def test_base_model_must_match_the_checkpoint(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="encoder_bert") as caught:
        _build(tmp_path, checkpoints["embed"], "encoder")
    assert "base_model" in str(caught.value) and "bert" in str(caught.value)
    assert not (tmp_path / "engines" / "broken").exists()


def test_unsupported_model_type_lists_the_supported_ones(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = _edited_copy(checkpoints["embed"], tmp_path, lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ModelError, match="gpt2") as caught:
        _build(tmp_path, folder, "encoder_bert")
    message = str(caught.value)
    assert "not supported" in message
    for model_type in ARCHITECTURES:
        assert model_type in message
