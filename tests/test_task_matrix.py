"""Parity matrix: every (model_type, task) that bei/testing/tiny_models.py can make, built and served over HTTP.

For each combination a tiny random checkpoint is written, built with `build_engine` for both CPU
targets (the ONNX Runtime engine, and the torch target's packed modules: `<case>-torch`) and
served in this process (bei/testing/inproc_server.py); its HTTP answers are compared with the
reference library on the same weights, at fp32 tolerances:

- embed:    /v1/embeddings and /embed vs `SentenceTransformer.encode` (cosine >= 0.99999)
- rerank:   /rerank, /v1/rerank and /predict vs `CrossEncoder.predict` and the raw logits of
            `AutoModelForSequenceClassification` (abs diff <= 1e-4)
- classify: /predict (texts, [[text]], [[a, b]]) vs softmax of `AutoModelForSequenceClassification`
- ner:      /predict_tokens vs softmax of `AutoModelForTokenClassification` per token and vs the
            transformers token-classification pipeline (none, simple, first, average, max)
- sparse:   /embed_sparse vs `SparseEncoder.encode` (same non-zero indices, values within 1e-4)

Beyond the (model_type, task) grid: BERT embedders with cls / max / weightedmean pooling, Dense +
Normalize modules, prompts excluded from pooling, a default prompt; EmbeddingGemma's layout (bidirectional
gemma3_text, mean pooling, bias-free Dense 32 -> 96 -> 32, Normalize, prompts) on both CPU targets; a
right-padded causal reranker; DeBERTa-v2 with its convolution (conv_kernel_size) as embedder and classifier on both CPU targets.
Tiny qwen2 checkpoints get the tokenizer.json transformers actually loads for qwen2 (see
`sync_tokenizer_json` in bei/testing/inproc_server.py), as real Qwen2 repos ship it.

The engines are built ahead of the tests by two worker processes (`EngineBuilder`), in the order the
tests run, so that the tests compare one engine while the next ones build. BEI_TEST_BUILD_WORKERS=0
builds inline instead.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from bei.testing.inproc_server import EngineBuilder, serve_engine
from bei.testing.tiny_models import DECODERS, SUPPORTED, TEXTS

pytestmark = pytest.mark.slow  # 155 engines built and served: about 13 minutes on two cores

MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-4
QUERY = "What is the capital of France?"
PAIRS = [(TEXTS[i], TEXTS[(i * 5 + 3) % len(TEXTS)]) for i in range(len(TEXTS))]
PROMPTS = {"query": "query: ", "passage": "Represent this passage for retrieval: "}
# model types whose tokenizer transformers rebuilds whatever tokenizer.json says (see
# bei/testing/inproc_server.py `sync_tokenizer_json`): their tiny checkpoints get transformers' tokenizer.json
SYNC_TOKENIZER = ("qwen2",)


@dataclass(frozen=True)
class Case:
    """One engine of the matrix: a tiny checkpoint of `model_type` for `task`, made with `kwargs`,
    built for `target` (`bei build --target`)."""

    name: str
    model_type: str
    task: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    target: str = "onnxruntime"

    def __str__(self) -> str:
        return self.name


def _case(model_type: str, task: str, variant: str = "", target: str = "onnxruntime", **kwargs: Any) -> Case:
    name = f"{model_type}-{task}" + (f"-{variant}" if variant else "") + ("" if target == "onnxruntime" else f"-{target}")
    return Case(name, model_type, task, kwargs, target)


def _embed_case(model_type: str, target: str) -> Case:
    pooling = "lasttoken" if model_type in DECODERS else "mean"
    return _case(model_type, "embed", target=target, pooling=pooling)


# every (model_type, task) is built for both CPU targets: the ONNX Runtime engine and the torch
# target's packed modules (fp32, eager on the CPU)
TARGETS = ("onnxruntime", "torch")


def _cases(task: str) -> list[Case]:
    return [
        _embed_case(mt, target) if task == "embed" else _case(mt, task, target=target)
        for target in TARGETS
        for mt, tasks in SUPPORTED.items()
        if task in tasks
    ]


# a causal classifier takes each row's last token that is not pad_token_id: right padding must pad
# with the tokenizer's pad token (not EOS) or the shorter rows of a batch score a pad
DEBERTA_CONV = {"conv_kernel_size": 3, "conv_act": "gelu"}
RERANK_VARIANTS = [_case("qwen3", "rerank", "right-padding", padding_side="right")]


EMBED_VARIANTS = [
    _case("bert", "embed", "cls", pooling="cls"),
    _case("bert", "embed", "max", pooling="max"),
    _case("bert", "embed", "weightedmean", pooling="weightedmean"),
    _case("bert", "embed", "dense-normalize", pooling="mean", dense=[(24, "tanh"), (16, "identity")], normalize=True),
    _case("bert", "embed", "prompt-excluded", pooling="mean", include_prompt=False, prompts=PROMPTS),
    _case("bert", "embed", "default-prompt", pooling="mean", prompts=PROMPTS, default_prompt_name="query"),
    # EmbeddingGemma: bidirectional Gemma3, mean pooling, bias-free Dense layers up and back down, Normalize, prompts
    *[
        _case(
            "gemma3_text",
            "embed",
            "embeddinggemma",
            target=target,
            pooling="mean",
            dense=[(96, "identity"), (32, "identity")],
            dense_bias=False,
            normalize=True,
            prompts=PROMPTS,
            padding_side="right",
            max_seq_length=128,
        )
        for target in TARGETS
    ],  # fmt: skip
    # DeBERTa-v2's convolution after the first layer (deberta-v2-xlarge's conv_kernel_size 3, gelu)
    *[_case("deberta-v2", "embed", "conv", target=target, pooling="mean", config_fields=DEBERTA_CONV) for target in TARGETS],
]


# --- engines ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Iterator[EngineBuilder]:
    """Queue the builds of every case this session will run, in the order the tests run. The references
    are tiny models: one torch thread each (`one_torch_thread`), rather than threads that spin against
    the build workers for the same cores."""
    workers = int(os.environ.get("BEI_TEST_BUILD_WORKERS", "2"))
    engines = EngineBuilder(tmp_path_factory.mktemp("matrix"), workers=workers)
    started = time.perf_counter()
    for item in request.session.items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if isinstance(case, Case) and item.module is request.module:
            engines.submit(case.name, case.model_type, case.task, case.kwargs, {"target": case.target},
                           sync_tokenizer=case.model_type in SYNC_TOKENIZER)  # fmt: skip
    try:
        yield engines
    finally:
        engines.close()
    if engines.seconds:
        total = time.perf_counter() - started
        slowest = sorted(engines.seconds.items(), key=lambda kv: -kv[1])[:3]
        print(f"\n{len(engines.seconds)} engines in {total:.0f}s; slowest builds: " + ", ".join(f"{k} {v:.1f}s" for k, v in slowest))


@pytest.fixture
def engine(builder: EngineBuilder, case: Case) -> tuple[Path, Path]:
    """(checkpoint folder, engine folder) of this test's case."""
    return builder.get(case.name)


@pytest.fixture
def client(engine: tuple[Path, Path]) -> Iterator[httpx.Client]:
    with serve_engine(engine[1]) as base_url, httpx.Client(base_url=base_url, timeout=60.0) as http:
        yield http


def post(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    response = client.post(path, json=body)
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
    return response.json()


# --- comparisons ------------------------------------------------------------------------------
def assert_cosine(got: Any, want: Any, what: str) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= MIN_COSINE, f"{what}: min cosine {cosine.min():.7f} (row {cosine.argmin()})"


def assert_close(got: Any, want: Any, what: str, tol: float = MAX_ABS_DIFF) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    diff = np.abs(got - want).max() if got.size else 0.0
    assert diff <= tol, f"{what}: max abs diff {diff:.2e} > {tol:.0e}\n got  {got.ravel()[:8]}\n want {want.ravel()[:8]}"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@functools.lru_cache(maxsize=2)
def _reference(folder: Path, head: str) -> tuple[Any, Any]:
    """(tokenizer, model) of transformers' AutoTokenizer and `AutoModelFor<head>`, in fp32, eval mode."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = getattr(transformers, f"AutoModelFor{head}").from_pretrained(str(folder), dtype=torch.float32).eval()
    return tokenizer, model


def sequence_logits(folder: Path, items: list[str] | list[tuple[str, str]]) -> np.ndarray:
    """Logits of AutoModelForSequenceClassification on a padded batch, tokenized as bei does."""
    tokenizer, model = _reference(folder, "SequenceClassification")
    if isinstance(items[0], tuple):
        batch = tokenizer([a for a, _ in items], [b for _, b in items], padding=True, truncation=True, return_tensors="pt")
    else:
        batch = tokenizer(list(items), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.double().numpy()


def assert_label_scores(answer: list[dict[str, Any]], want: np.ndarray, labels: list[str], what: str) -> None:
    """One /predict answer: every label once, sorted by score (highest first), equal to `want`."""
    scores = [item["score"] for item in answer]
    assert scores == sorted(scores, reverse=True), f"{what}: not sorted by score: {answer}"
    assert sorted(item["label"] for item in answer) == sorted(labels), f"{what}: labels {answer}"
    got = {item["label"]: item["score"] for item in answer}
    assert_close([got[label] for label in labels], want, what)


# --- embed ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _cases("embed"), ids=str)
def test_embed(case: Case, engine: tuple[Path, Path], client: httpx.Client) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(engine[0]), device="cpu")
    reference = model.encode(TEXTS, convert_to_numpy=True)
    answer = post(client, "/v1/embeddings", {"input": TEXTS, "encoding_format": "float"})
    assert [d["index"] for d in answer["data"]] == list(range(len(TEXTS)))
    assert_cosine([d["embedding"] for d in answer["data"]], reference, f"{case} /v1/embeddings")
    single = post(client, "/embed", {"inputs": TEXTS[3]})
    assert_cosine(single, reference[3:4], f"{case} /embed one text")


@pytest.mark.parametrize("case", EMBED_VARIANTS, ids=str)
def test_embed_variant(case: Case, engine: tuple[Path, Path], client: httpx.Client) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(engine[0]), device="cpu")
    reference = model.encode(TEXTS, convert_to_numpy=True)
    answer = post(client, "/v1/embeddings", {"input": TEXTS, "encoding_format": "float"})
    vectors = np.array([d["embedding"] for d in answer["data"]])
    assert_cosine(vectors, reference, f"{case} /v1/embeddings")
    raw = post(client, "/embed", {"inputs": TEXTS, "normalize": False})
    if case.kwargs.get("normalize"):
        # the Normalize module: unit vectors on /v1/embeddings, equal to the reference's
        assert_close(np.linalg.norm(vectors, axis=1), np.ones(len(TEXTS)), f"{case} norms", tol=1e-5)
        assert_close(vectors, reference, f"{case} normalized vectors")
    else:
        assert_close(raw, reference, f"{case} /embed normalize=false", tol=1e-4 * max(1.0, float(np.abs(reference).max())))
    if case.kwargs.get("prompts"):
        for name in PROMPTS:
            prompted = model.encode(TEXTS, prompt_name=name, convert_to_numpy=True)
            got = post(client, "/embed", {"inputs": TEXTS, "prompt_name": name, "normalize": False})
            assert_cosine(got, prompted, f"{case} /embed prompt_name={name}")
    if case.kwargs.get("default_prompt_name"):
        # the default prompt is applied where no prompt is named: the reference used it too
        default = model.encode(TEXTS, prompt_name=case.kwargs["default_prompt_name"], convert_to_numpy=True)
        bare = model.encode(TEXTS, prompt="", convert_to_numpy=True)
        assert_close(reference, default, f"{case} reference default prompt", tol=1e-6)
        assert np.abs(bare - default).max() > 1e-3, "the default prompt does not change the reference embeddings"
        assert_cosine(post(client, "/embed", {"inputs": TEXTS}), default, f"{case} /embed default prompt")


# --- rerank -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _cases("rerank") + RERANK_VARIANTS, ids=str)
def test_rerank(case: Case, engine: tuple[Path, Path], client: httpx.Client) -> None:
    from sentence_transformers import CrossEncoder

    folder = engine[0]
    pairs = [(QUERY, text) for text in TEXTS]
    cross_encoder = CrossEncoder(str(folder), device="cpu")
    predicted = cross_encoder.predict(pairs, convert_to_numpy=True).astype(np.float64)
    logits = sequence_logits(folder, pairs)
    assert logits.shape == (len(TEXTS), 1)
    # sentence-transformers 6 applies its default activation for one label, a sigmoid
    assert_close(predicted, sigmoid(logits[:, 0]), f"{case} CrossEncoder.predict is sigmoid(logits)", tol=1e-6)

    answer = post(client, "/rerank", {"query": QUERY, "texts": TEXTS, "return_text": True})
    assert [r["index"] for r in answer] == list(range(len(TEXTS))), "/rerank: not in the order of the texts"
    assert [r["text"] for r in answer] == TEXTS
    scores = np.array([r["score"] for r in answer])
    assert_close(scores, predicted, f"{case} /rerank scores")
    raw = post(client, "/rerank", {"query": QUERY, "texts": TEXTS, "raw_scores": True})
    assert "text" not in raw[0]
    assert_close([r["score"] for r in raw], logits[:, 0], f"{case} /rerank raw_scores")

    top_n = 5
    cohere = post(client, "/v1/rerank", {"query": QUERY, "documents": TEXTS, "top_n": top_n, "return_documents": True})
    results = cohere["results"]
    assert len(results) == top_n
    relevance = [r["relevance_score"] for r in results]
    assert relevance == sorted(relevance, reverse=True), "/v1/rerank: not sorted by relevance"
    assert [r["index"] for r in results] == sorted(range(len(TEXTS)), key=lambda i: -scores[i])[:top_n]
    assert [r["document"]["text"] for r in results] == [TEXTS[r["index"]] for r in results]
    assert_close(relevance, predicted[[r["index"] for r in results]], f"{case} /v1/rerank scores")
    assert cohere["usage"]["total_tokens"] > 0

    predict = post(client, "/predict", {"inputs": [[q, t] for q, t in pairs]})
    assert len(predict) == len(pairs) and all(len(row) == 1 for row in predict)
    assert_close([row[0]["score"] for row in predict], predicted, f"{case} /predict pairs")
    predict_raw = post(client, "/predict", {"inputs": [[q, t] for q, t in pairs], "raw_scores": True})
    assert_close([row[0]["score"] for row in predict_raw], logits[:, 0], f"{case} /predict pairs raw_scores")


# --- classify ---------------------------------------------------------------------------------
CLASSIFY_VARIANTS = [_case("deberta-v2", "classify", "conv", target=target, config_fields=DEBERTA_CONV) for target in TARGETS]


@pytest.mark.parametrize("case", _cases("classify") + CLASSIFY_VARIANTS, ids=str)
def test_classify(case: Case, engine: tuple[Path, Path], client: httpx.Client) -> None:
    from transformers import AutoConfig

    folder = engine[0]
    config = AutoConfig.from_pretrained(str(folder))
    labels = [config.id2label[i] for i in range(config.num_labels)]
    text_logits = sequence_logits(folder, TEXTS)
    pair_logits = sequence_logits(folder, PAIRS)

    for body in ({"inputs": TEXTS}, {"inputs": [[t] for t in TEXTS]}):
        answer = post(client, "/predict", body)
        assert len(answer) == len(TEXTS)
        for i, row in enumerate(answer):
            assert_label_scores(row, softmax(text_logits[i]), labels, f"{case} /predict text {i}")
    single = post(client, "/predict", {"inputs": TEXTS[1]})
    assert_label_scores(single, softmax(text_logits[1]), labels, f"{case} /predict one text")

    answer = post(client, "/predict", {"inputs": [list(p) for p in PAIRS]})
    for i, row in enumerate(answer):
        assert_label_scores(row, softmax(pair_logits[i]), labels, f"{case} /predict pair {i}")
    raw = post(client, "/predict", {"inputs": [list(p) for p in PAIRS], "raw_scores": True})
    for i, row in enumerate(raw):
        assert_label_scores(row, pair_logits[i], labels, f"{case} /predict pair {i} raw_scores")
    assert {max(row, key=lambda r: r["score"])["label"] for row in answer} != set(), "no labels"


# --- ner --------------------------------------------------------------------------------------
def token_probabilities(folder: Path, text: str) -> tuple[list[int], list[int], list[tuple[int, int]], np.ndarray]:
    """Positions, ids, offsets and softmax scores of the non-special tokens of `text` (one unpadded forward)."""
    tokenizer, model = _reference(folder, "TokenClassification")
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0].double().numpy()
    keep = [i for i, special in enumerate(enc["special_tokens_mask"][0].tolist()) if not special]
    ids = enc["input_ids"][0].tolist()
    offsets = [tuple(o) for o in enc["offset_mapping"][0].tolist()]
    return keep, [ids[i] for i in keep], [offsets[i] for i in keep], softmax(logits[keep])


@pytest.mark.parametrize("case", _cases("ner"), ids=str)
def test_ner(case: Case, engine: tuple[Path, Path], client: httpx.Client) -> None:
    from transformers import AutoConfig, pipeline

    folder = engine[0]
    config = AutoConfig.from_pretrained(str(folder))
    labels = [config.id2label[i] for i in range(config.num_labels)]

    answer = post(client, "/predict_tokens", {"inputs": TEXTS, "aggregation_strategy": "none"})
    assert len(answer) == len(TEXTS)
    reference_pipeline = pipeline("token-classification", model=str(folder), aggregation_strategy="none", device="cpu")
    non_o = 0
    for text, tokens in zip(TEXTS, answer, strict=False):
        positions, ids, offsets, probs = token_probabilities(folder, text)
        assert [t["token_id"] for t in tokens] == ids, f"{case}: token ids of {text!r}"
        assert [(t["start"], t["end"]) for t in tokens] == offsets, f"{case}: offsets of {text!r}"
        got = np.array([[t["results"][label] for label in labels] for t in tokens])
        assert_close(got, probs, f"{case} per-token scores of {text!r}")
        # the pipeline leaves out "O" and special tokens: compare on the tokens it returns, found by
        # their position (offsets alone are ambiguous: a Metaspace "▁" and the next piece can share one)
        by_position = dict(zip(positions, tokens, strict=False))
        for entity in reference_pipeline(text):
            token = by_position[entity["index"]]
            assert (token["start"], token["end"]) == (entity["start"], entity["end"]), f"{case}: {text!r} {entity}"
            best = max(token["results"], key=token["results"].get)
            assert best == entity["entity"], f"{case}: {text!r} {entity}: bei says {best}"
            assert abs(token["results"][best] - float(entity["score"])) <= MAX_ABS_DIFF
            non_o += 1
    assert non_o > 0, "the random model labels every token O: pick another seed"

    raw = post(client, "/predict_tokens", {"inputs": [TEXTS[3]], "raw_scores": True})[0]
    probs = np.array([[t["results"][label] for label in labels] for t in raw])
    assert_close(softmax(probs), token_probabilities(folder, TEXTS[3])[3], f"{case} raw_scores are logits")

    for strategy in ("simple", "first", "average", "max"):
        groups = post(client, "/predict_tokens", {"inputs": TEXTS, "aggregation_strategy": strategy})
        total = 0
        for text, got in zip(TEXTS, groups, strict=False):
            want = reference_pipeline(text, aggregation_strategy=strategy)
            what = f"{case} {strategy} {text!r}"
            assert [(g["entity_group"], g["word"], g["start"], g["end"]) for g in got] == [
                (w["entity_group"], w["word"], w["start"], w["end"]) for w in want
            ], f"{what}:\n got  {got}\n want {want}"
            assert_close([g["score"] for g in got], [float(w["score"]) for w in want], what)
            total += len(want)
        assert total > 0, f"{strategy}: no entities in any text"


# --- sparse -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _cases("sparse"), ids=str)
def test_sparse(case: Case, engine: tuple[Path, Path], client: httpx.Client) -> None:
    from sentence_transformers import SparseEncoder

    encoded = SparseEncoder(str(engine[0]), device="cpu").encode(TEXTS, convert_to_tensor=True)
    reference = encoded.to_dense().double().numpy()
    answer = post(client, "/embed_sparse", {"inputs": TEXTS})
    assert len(answer) == len(TEXTS)
    for i, (row, want) in enumerate(zip(answer, reference, strict=False)):
        got = np.zeros_like(want)
        indices = [item["index"] for item in row]
        assert indices == sorted(indices), "indices are not ascending"
        got[indices] = [item["value"] for item in row]
        # a weight that is zero on one side may be a rounding-level positive on the other
        differ = set(indices) ^ set(np.flatnonzero(want).tolist())
        assert all(max(got[j], want[j]) <= 1e-5 for j in differ), f"{case} row {i}: non-zero indices differ: {sorted(differ)[:10]}"
        assert_close(got, want, f"{case} row {i} values")
