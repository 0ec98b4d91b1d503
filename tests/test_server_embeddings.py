"""The live `bei serve` of all-MiniLM-L6-v2 over real HTTP: numbers against sentence-transformers,
the OpenAI client (base64 by default), TEI's /embed, errors, headers and the GET routes."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from bei.api.routes import TASK_ROUTES
from bei.kinds import Task
from tests.servers import MINILM_NAME, Server, assert_close_rows, cosine

TEXTS = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "Zürich, Köln und München liegen in Mitteleuropa; naïve café crème brûlée.",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "What?!... (yes) -- no; 'maybe' \"quoted\" #hashtag @user $5.00 100% & more...",
    "emoji test 🚀🔥 with symbols ∑ ∫ √ ≠",
    "A",
    "   leading and trailing spaces   ",
    # long-ish, still under 256 tokens
    " ".join(
        f"Sentence {i} talks about embeddings, batching, token budgets and the serving of models on CPUs." for i in range(10)
    ),  # 232 tokens
]

# over 256 tokens, with a beginning and an end about different things (so Left and Right truncation differ)
LONG_TEXT = (
    "Baking bread at home starts with flour, water, salt and yeast kneaded into a smooth dough. " * 12
    + "Distant galaxies recede from us as the universe expands, observed through redshifted starlight. " * 12
)

OPENAI_ERROR_KEYS = {"message", "type", "code"}
TIMING_HEADERS = ("x-compute-tokens", "x-queue-time", "x-inference-time", "x-total-time")


def st_encode(st: Any, texts: list[str]) -> np.ndarray:
    return np.asarray(st.encode(texts, convert_to_numpy=True, batch_size=16), dtype=np.float64)


@pytest.fixture(scope="module")
def reference(st_model: Any) -> np.ndarray:
    return st_encode(st_model, TEXTS)


@pytest.fixture()
def client(minilm_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{minilm_server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def token_ids(st: Any, text: str) -> list[int]:
    """Ids as the model's tokenizer makes them, special tokens included, not truncated."""
    return list(st.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])


def check_timing_headers(response: httpx.Response) -> None:
    for name in TIMING_HEADERS:
        assert name in response.headers, f"{name} missing from a {response.status_code} answer: {dict(response.headers)}"
        assert float(response.headers[name]) >= 0


# --- OpenAI client --------------------------------------------------------------------------
def test_openai_client_default_base64_matches_sentence_transformers(minilm_server: Server, reference: np.ndarray) -> None:
    sent: list[dict[str, Any]] = []

    def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    with httpx.Client(event_hooks={"request": [record]}) as transport:
        client = openai.OpenAI(base_url=f"{minilm_server.base_url}/v1", api_key="unused", max_retries=0, http_client=transport)
        result = client.embeddings.create(model=MINILM_NAME, input=TEXTS)
    assert sent and sent[0].get("encoding_format") == "base64", f"the client sent {sent}"
    assert [item.index for item in result.data] == list(range(len(TEXTS)))
    assert result.model == MINILM_NAME
    vectors = np.array([item.embedding for item in result.data])
    assert vectors.shape == (len(TEXTS), 384)
    assert_close_rows(vectors, reference, what="openai base64")
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_texts_are_under_the_limit(st_model: Any) -> None:
    lengths = [len(token_ids(st_model, t)) for t in TEXTS]
    assert max(lengths) < 256 and max(lengths) > 200, lengths


def test_openai_client_float_matches_sentence_transformers(client: openai.OpenAI, reference: np.ndarray, st_model: Any) -> None:
    result = client.embeddings.create(model=MINILM_NAME, input=TEXTS, encoding_format="float")
    assert result.object == "list"
    assert [item.index for item in result.data] == list(range(len(TEXTS)))
    assert all(item.object == "embedding" for item in result.data)
    assert_close_rows([item.embedding for item in result.data], reference, what="openai float")
    expected_tokens = sum(len(token_ids(st_model, t)) for t in TEXTS)
    assert result.usage.prompt_tokens == expected_tokens
    assert result.usage.total_tokens == expected_tokens


def test_openai_single_string_input(client: openai.OpenAI, reference: np.ndarray, st_model: Any) -> None:
    result = client.embeddings.create(model=MINILM_NAME, input=TEXTS[2], encoding_format="float")
    assert len(result.data) == 1 and result.data[0].index == 0
    assert_close_rows([result.data[0].embedding], reference[2:3], what="single string")
    assert result.usage.prompt_tokens == len(token_ids(st_model, TEXTS[2]))


def test_data_keeps_input_order(client: openai.OpenAI, reference: np.ndarray) -> None:
    order = [9, 0, 7, 3, 3, 5, 1]  # long first, a duplicate, short last: batching sorts by length
    result = client.embeddings.create(model=MINILM_NAME, input=[TEXTS[i] for i in order])
    assert [item.index for item in result.data] == list(range(len(order)))
    assert_close_rows([item.embedding for item in result.data], reference[order], what="reordered")


@pytest.mark.parametrize("encoding_format", [None, "float"])  # None: the client's default (base64, decoded by it)
def test_dimensions_truncates_then_renormalizes(client: openai.OpenAI, reference: np.ndarray, encoding_format: str | None) -> None:
    extra: dict[str, Any] = {"encoding_format": encoding_format} if encoding_format else {}
    result = client.embeddings.create(model=MINILM_NAME, input=TEXTS[:4], dimensions=64, **extra)
    vectors = np.array([item.embedding for item in result.data])
    assert vectors.shape == (4, 64)
    expected = reference[:4, :64] / np.linalg.norm(reference[:4, :64], axis=1, keepdims=True)
    assert_close_rows(vectors, expected, what="dimensions=64")
    np.testing.assert_allclose(vectors, expected, atol=1e-4)


def test_base64_is_little_endian_float32(http: httpx.Client, reference: np.ndarray) -> None:
    floats = http.post("/v1/embeddings", json={"input": TEXTS[:3], "encoding_format": "float"})
    encoded = http.post("/v1/embeddings", json={"input": TEXTS[:3], "encoding_format": "base64"})
    assert floats.status_code == encoded.status_code == 200, encoded.text
    for f_item, b_item, expected in zip(floats.json()["data"], encoded.json()["data"], reference, strict=False):
        assert isinstance(b_item["embedding"], str)
        raw = base64.b64decode(b_item["embedding"])
        assert len(raw) == 384 * 4
        decoded = np.frombuffer(raw, dtype="<f4")
        np.testing.assert_allclose(decoded, np.array(f_item["embedding"], dtype=np.float32), rtol=0, atol=1e-7)
        assert cosine(decoded, expected) >= 0.99999
        # a big-endian reading would be garbage: the format is really little-endian
        assert not np.allclose(np.frombuffer(raw, dtype=">f4"), decoded)


def test_response_has_every_openai_field(http: httpx.Client) -> None:
    body = http.post("/v1/embeddings", json={"input": ["a b c", "d"], "model": "whatever-client-name"}).json()
    assert body["object"] == "list"
    assert isinstance(body["model"], str)
    assert isinstance(body["usage"]["prompt_tokens"], int) and isinstance(body["usage"]["total_tokens"], int)
    assert [set(item) for item in body["data"]] == [{"object", "embedding", "index"}] * 2


# --- token ids -----------------------------------------------------------------------------
def test_token_id_input_equals_the_text(http: httpx.Client, st_model: Any, reference: np.ndarray) -> None:
    ids = [token_ids(st_model, t) for t in TEXTS[:4]]
    assert ids[0][0] == st_model.tokenizer.cls_token_id and ids[0][-1] == st_model.tokenizer.sep_token_id

    single = http.post("/v1/embeddings", json={"input": ids[1], "encoding_format": "float"})
    assert single.status_code == 200, single.text
    data = single.json()["data"]
    assert len(data) == 1, "a flat [int] list is ONE input, not one input per id"
    assert_close_rows([data[0]["embedding"]], reference[1:2], what="[int]")
    assert single.json()["usage"]["prompt_tokens"] == len(ids[1])

    many = http.post("/v1/embeddings", json={"input": ids, "encoding_format": "float"})
    assert many.status_code == 200, many.text
    assert_close_rows([d["embedding"] for d in many.json()["data"]], reference[:4], what="[[int]]")
    assert many.json()["usage"]["prompt_tokens"] == sum(map(len, ids))

    tei = http.post("/embed", json={"inputs": ids})
    assert tei.status_code == 200, tei.text
    assert_close_rows(tei.json(), reference[:4], what="/embed [[int]]")


def test_token_id_outside_vocabulary_is_422(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"input": [101, 10**7, 102]})
    assert response.status_code == 422, response.text
    assert "vocabulary" in response.json()["error"]["message"]


def test_booleans_are_not_token_ids(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"input": [True, False]})
    assert response.status_code == 422, response.text
    assert "input" in response.json()["error"]["message"]


def test_chunked_body_over_the_limit_is_413(http: httpx.Client) -> None:
    def body():  # type: ignore[no-untyped-def]  # a generator body goes out chunked, without content-length
        yield b'{"input": "'
        for _ in range(300):
            yield b"x" * 10_000
        yield b'"}'

    response = http.post("/v1/embeddings", content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text


# --- TEI /embed ----------------------------------------------------------------------------
def test_embed_normalized(http: httpx.Client, reference: np.ndarray) -> None:
    response = http.post("/embed", json={"inputs": TEXTS})
    assert response.status_code == 200, response.text
    check_timing_headers(response)
    assert_close_rows(response.json(), reference, what="/embed")
    single = http.post("/embed", json={"inputs": TEXTS[3]})
    assert_close_rows(single.json(), reference[3:4], what="/embed single")


def test_embed_unnormalized_is_the_mean_pooled_vector(http: httpx.Client, st_model_unnormalized: Any) -> None:
    raw_model = st_model_unnormalized
    expected = st_encode(raw_model, TEXTS[:5])
    norms = np.linalg.norm(expected, axis=1)
    assert (np.abs(norms - 1) > 0.5).all(), f"the reference is not un-normalized: {norms}"
    response = http.post("/embed", json={"inputs": TEXTS[:5], "normalize": False})
    assert response.status_code == 200, response.text
    actual = np.array(response.json())
    assert_close_rows(actual, expected, what="normalize=false")
    np.testing.assert_allclose(actual, expected, atol=2e-4)


def test_embed_truncate_right_equals_sentence_transformers(http: httpx.Client, st_model: Any) -> None:
    assert len(token_ids(st_model, LONG_TEXT)) > 256
    expected = st_encode(st_model, [LONG_TEXT])  # sentence-transformers truncates at 256, on the right
    right = http.post("/embed", json={"inputs": [LONG_TEXT], "truncate": True})
    assert right.status_code == 200, right.text
    assert right.headers["x-compute-tokens"] == "256"
    assert_close_rows(right.json(), expected, what="truncate right")

    explicit = http.post("/embed", json={"inputs": [LONG_TEXT], "truncate": True, "truncation_direction": "Right"})
    assert_close_rows(explicit.json(), expected, what="truncation_direction Right")


def test_embed_truncate_left_keeps_the_end(http: httpx.Client, st_model: Any) -> None:
    left = http.post("/embed", json={"inputs": [LONG_TEXT], "truncate": True, "truncation_direction": "Left"})
    right = http.post("/embed", json={"inputs": [LONG_TEXT], "truncate": True, "truncation_direction": "Right"})
    assert left.status_code == right.status_code == 200, left.text
    assert cosine(left.json()[0], right.json()[0]) < 0.95, "Left and Right truncation gave the same vector"
    # left truncation keeps [CLS] + the last 254 tokens of the text + [SEP]
    body = token_ids(st_model, LONG_TEXT)[1:-1]
    tok = st_model.tokenizer
    tail = [tok.cls_token_id, *body[-254:], tok.sep_token_id]
    expected = http.post("/embed", json={"inputs": [tail]})
    assert expected.status_code == 200, expected.text
    assert_close_rows(left.json(), expected.json(), what="truncation_direction Left")


def test_text_over_the_limit_without_truncate_is_422(http: httpx.Client, st_model: Any) -> None:
    n = len(token_ids(st_model, LONG_TEXT))
    for body in ({"inputs": LONG_TEXT}, {"inputs": [TEXTS[0], LONG_TEXT], "truncate": False}):
        response = http.post("/embed", json=body)
        assert response.status_code == 422, response.text
        message = response.json()["error"]
        assert str(n) in message and "256" in message, message
        check_timing_headers(response)
    openai_style = http.post("/v1/embeddings", json={"input": LONG_TEXT})
    assert openai_style.status_code == 422
    assert str(n) in openai_style.json()["error"]["message"]


def test_embed_dimensions(http: httpx.Client, reference: np.ndarray) -> None:
    response = http.post("/embed", json={"inputs": TEXTS[:2], "dimensions": 32})
    assert response.status_code == 200, response.text
    expected = reference[:2, :32] / np.linalg.norm(reference[:2, :32], axis=1, keepdims=True)
    assert_close_rows(response.json(), expected, what="/embed dimensions")
    too_many = http.post("/embed", json={"inputs": TEXTS[:2], "dimensions": 385})
    assert too_many.status_code == 422


# --- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [{"inputs": ""}, {"inputs": []}, {"inputs": ["ok", ""]}])
def test_embed_empty_input_is_400(http: httpx.Client, body: dict[str, Any]) -> None:
    response = http.post("/embed", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error", "error_type"}
    assert response.json()["error_type"] == "empty"
    check_timing_headers(response)


@pytest.mark.parametrize("body", [{"input": ""}, {"input": []}])
def test_openai_empty_input_is_400_in_openai_shape(http: httpx.Client, body: dict[str, Any]) -> None:
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == OPENAI_ERROR_KEYS
    assert error["code"] == 400 and "empty" in error["message"]
    check_timing_headers(response)


def test_openai_client_surfaces_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model=MINILM_NAME, input=[""])
    assert empty.value.status_code == 400 and "empty" in str(empty.value)
    with pytest.raises(openai.UnprocessableEntityError) as too_many:
        client.embeddings.create(model=MINILM_NAME, input=["x"] * 2049)
    assert "2048" in str(too_many.value)


@pytest.mark.parametrize("path", ["/embed", "/v1/embeddings"])
def test_malformed_json_is_422(http: httpx.Client, path: str) -> None:
    response = http.post(path, content=b'{"inputs": ["unterminated', headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    body = response.json()
    message = body["error"]["message"] if path.startswith("/v1/") else body["error"]
    assert "JSON" in message
    check_timing_headers(response)


def test_wrong_field_type_is_422_naming_the_field(http: httpx.Client) -> None:
    response = http.post("/embed", json={"inputs": "a", "normalize": "sometimes"})
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("normalize")
    assert response.json()["error_type"] == "validation"

    response = http.post("/v1/embeddings", json={"input": "a", "dimensions": "many"})
    assert response.status_code == 422, response.text
    assert "dimensions" in response.json()["error"]["message"]

    response = http.post("/v1/embeddings", json={"input": 5})
    assert response.status_code == 422
    assert "input" in response.json()["error"]["message"]

    response = http.post("/embed", json={"inputs": "a", "truncation_direction": "Up"})
    assert response.status_code == 422
    assert "truncation_direction" in response.json()["error"]


def test_missing_field_is_422(http: httpx.Client) -> None:
    response = http.post("/embed", json={"input": "wrong name"})
    assert response.status_code == 422
    assert "inputs" in response.json()["error"]


def test_too_many_inputs_is_422(http: httpx.Client) -> None:
    info = http.get("/info").json()
    limit = info["max_client_batch_size"]
    assert limit == 2048  # OpenAI's limit
    at_limit = http.post("/embed", json={"inputs": ["x"] * limit})
    assert at_limit.status_code == 200, at_limit.text
    assert len(at_limit.json()) == limit
    over = http.post("/embed", json={"inputs": ["x"] * (limit + 1)})
    assert over.status_code == 422, over.text
    assert str(limit) in over.json()["error"]
    over_openai = http.post("/v1/embeddings", json={"input": ["x"] * (limit + 1)})
    assert over_openai.status_code == 422
    assert set(over_openai.json()["error"]) == OPENAI_ERROR_KEYS


def test_body_over_the_payload_limit_is_413(http: httpx.Client) -> None:
    big = json.dumps({"inputs": "word " * 500_000}).encode()  # 2.5 MB, over the default 2 MB
    assert len(big) > 2_000_000
    for path in ("/embed", "/v1/embeddings"):
        response = http.post(path, content=big, headers={"content-type": "application/json"})
        assert response.status_code == 413, response.text
        check_timing_headers(response)
    # the server still answers afterwards
    assert http.post("/embed", json={"inputs": "still alive"}).status_code == 200


# a valid body for each task route an embedding engine cannot serve
OTHER_TASK_BODIES: dict[str, dict[str, Any]] = {
    "/rerank": {"query": "q", "texts": ["a", "b"]},
    "/v1/rerank": {"query": "q", "documents": ["a", "b"]},
    "/v2/rerank": {"query": "q", "documents": ["a", "b"]},
    "/predict": {"inputs": "a"},
    "/classify": {"input": ["a"]},
    "/v1/classify": {"input": ["a"]},
    "/predict_tokens": {"inputs": "a"},
    "/embed_sparse": {"inputs": "a"},
    "/embed_all": {"inputs": "a"},
}


def test_other_task_routes_are_listed() -> None:
    other = {path for r in TASK_ROUTES if Task.EMBED not in r.tasks and r.path != "/tokenize" for path in r.paths}
    assert set(OTHER_TASK_BODIES) == other


@pytest.mark.parametrize("path", list(OTHER_TASK_BODIES))
def test_wrong_route_for_an_embedding_engine(http: httpx.Client, path: str) -> None:
    """The route exists (for rerank, classify, NER, sparse or bge-m3 engines): an embedding engine answers 400
    naming the routes that fit (api.md, "Routes")."""
    response = http.post(path, json=OTHER_TASK_BODIES[path])
    assert response.status_code == 400, response.text
    body = response.json()
    if path in ("/classify", "/v1/classify"):  # Infinity's routes answer errors in OpenAI's shape
        assert set(body["error"]) == OPENAI_ERROR_KEYS
        message, error_type = body["error"]["message"], body["error"]["type"]
    elif path.startswith(("/v1/", "/v2/")):  # Cohere's rerank, in Cohere's
        assert set(body) == {"message", "error_type"}
        message, error_type = body["message"], body["error_type"]
    else:
        message, error_type = body["error"], body["error_type"]
    assert "/v1/embeddings" in message and "/embed" in message
    assert error_type == "wrong_route"


def test_default_route_is_openai_embeddings(http: httpx.Client, reference: np.ndarray) -> None:
    response = http.post("/", json={"input": [TEXTS[0]], "encoding_format": "float"})
    assert response.status_code == 200, response.text
    assert_close_rows([response.json()["data"][0]["embedding"]], reference[:1], what="POST /")


# --- headers and GET routes ----------------------------------------------------------------
def test_compute_tokens_header_counts_tokens(http: httpx.Client, st_model: Any) -> None:
    response = http.post("/v1/embeddings", json={"input": TEXTS[:3]})
    check_timing_headers(response)
    assert int(response.headers["x-compute-tokens"]) == sum(len(token_ids(st_model, t)) for t in TEXTS[:3])
    total = float(response.headers["x-total-time"])
    assert total >= float(response.headers["x-inference-time"]) > 0


def test_health_info_models(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    info = http.get("/info").json()
    assert info["model_id"] == MINILM_NAME
    assert info["max_input_length"] == 256
    assert info["task"] == "embed"
    assert info["embedding_dim"] == 384
    assert {"/embed", "/v1/embeddings"} <= set(info["routes"])
    assert not {"/rerank", "/v1/rerank", "/predict", "/predict_tokens", "/embed_sparse"} & set(info["routes"])
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MINILM_NAME]


def test_openapi_lists_the_routes(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    assert "/v1/embeddings" in schema["paths"] and "/embed" in schema["paths"]
    assert "post" in schema["paths"]["/embed"]
    assert http.get("/docs").status_code == 200


def test_metrics_count_requests(http: httpx.Client) -> None:
    before = http.get("/metrics")
    assert before.status_code == 200
    assert "bei_requests_total" in before.text
    line = 'bei_requests_total{route="/embed",status="400"}'

    def count(text: str) -> float:  # prometheus-client writes every value as a float: 3.0
        return next((float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)), 0.0)

    http.post("/embed", json={"inputs": ""})
    after = http.get("/metrics").text
    assert count(after) == count(before.text) + 1


def test_metrics_parse_as_prometheus(http: httpx.Client) -> None:
    """The /metrics body as Prometheus reads it: every family with its type, and a histogram whose
    buckets are cumulative, end at +Inf and count each request answered."""
    from prometheus_client.parser import text_string_to_metric_families

    def families(response: httpx.Response) -> dict[str, Any]:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        return {f.name: f for f in text_string_to_metric_families(response.text)}

    def request_count(family: Any) -> float:
        return next(s.value for s in family.samples if s.name == "bei_request_seconds_count")

    before = families(http.get("/metrics"))
    ok = http.post("/embed", json={"inputs": ["metrics", "parse"]})
    assert ok.status_code == 200, ok.text
    after = families(http.get("/metrics"))

    counters = ("bei_requests", "bei_tokens", "bei_batches", "bei_dropped_inputs")
    gauges = ("bei_queue_depth", "bei_requests_in_flight")
    histograms = ("bei_queue_seconds", "bei_inference_seconds", "bei_request_seconds", "bei_request_tokens")
    histograms += ("bei_tokenization_seconds", "bei_batch_size", "bei_batch_tokens")
    expected = {name: "counter" for name in counters} | {name: "gauge" for name in gauges} | {name: "histogram" for name in histograms}
    assert {name: after[name].type for name in expected if name in after} == expected
    assert "process_resident_memory_bytes" in after or "python_info" in after  # the library's own collectors

    requests = {(s.labels["route"], s.labels["status"]): s.value for s in after["bei_requests"].samples}
    assert requests[("/embed", "200")] >= 1

    histogram = after["bei_request_seconds"]
    buckets = [s for s in histogram.samples if s.name == "bei_request_seconds_bucket"]
    bounds = [s.labels["le"] for s in buckets]
    assert bounds == ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf"]
    values = [s.value for s in buckets]
    assert values == sorted(values), "buckets are cumulative"
    assert values[-1] == request_count(histogram)
    assert request_count(histogram) == request_count(before["bei_request_seconds"]) + 1

    sizes = [s.labels["le"] for s in after["bei_batch_size"].samples if s.name == "bei_batch_size_bucket"]
    assert sizes[:3] == ["1", "2", "4"] and sizes[-2:] == ["65536", "+Inf"]
