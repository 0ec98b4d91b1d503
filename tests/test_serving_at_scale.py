"""Serving at scale, over real HTTP: two tiny engines (a bert embedder with mean pooling + Normalize and a
bert reranker) served TOGETHER by one `bei serve DIR1 DIR2` subprocess, plus single-engine servers for
limits, load and SIGTERM, and in-process servers whose backend fails or blocks on purpose.

Every number is compared with sentence-transformers (SentenceTransformer / CrossEncoder) on the same
weights, or with the server's own single-request answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from tests.servers import Server, assert_close_rows, metric_value

EMBED = "tiny-embed"
RERANK = "tiny-rerank"
SCORE_ATOL = 1e-5
START_TIMEOUT_S = 150  # four servers start at once on a machine that other jobs load
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "engine",
    "token",
    "budget",
    "batch",
    "queue",
    "vector",
    "cosine",
    "server",
    "request",
    "latency",
    "throughput",
    "model",
    "layer",
    "attention",
    "pooling",
    "norm",
    "river",
    "mountain",
    "ocean",
    "forest",
    "city",
    "music",
    "paint",
    "coffee",
    "train",
    "ticket",
    "library",
    "archive",
    "letter",
    "report",
    "search",
    "capital",
    "france",
    "paris",
    "london",
    "berlin",
]


def make_texts(seed: int, count: int, low: int = 2, high: int = 14) -> list[str]:
    """Distinct short texts (well under the tiny models' 64-token limit)."""
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for i in range(count)]


TEXTS = make_texts(1, 40)


# --- engines, references, servers -------------------------------------------------------------
@dataclass(frozen=True)
class Built:
    embed_checkpoint: Path
    rerank_checkpoint: Path
    embed_dir: Path
    rerank_dir: Path
    root: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    from bei.build import build_engine
    from bei.config import parse_config
    from bei.modeling.detect import ARCHITECTURES
    from bei.progress import Progress
    from bei.testing.tiny_models import make_checkpoint

    root = tmp_path_factory.mktemp("serving-at-scale")
    checkpoints = {
        EMBED: make_checkpoint(root / "checkpoints" / EMBED, "bert", "embed", pooling="mean", normalize=True),
        RERANK: make_checkpoint(root / "checkpoints" / RERANK, "bert", "rerank", seed=1),
    }
    dirs = {}
    for name, checkpoint in checkpoints.items():
        config = {
            "model_name": name,
            "trt_llm": {
                "build": {
                    "base_model": ARCHITECTURES["bert"],
                    "checkpoint_repository": {"source": "LOCAL", "repo": str(checkpoint)},
                    "cpu_precision": "fp32",  # the fp32 engine its reference is compared with
                }
            },
        }
        result = build_engine(parse_config(config), config_dir=root, engines_root=root / "engines", progress=Progress([], enabled=False))
        dirs[name] = result.engine_dir
    return Built(checkpoints[EMBED], checkpoints[RERANK], dirs[EMBED], dirs[RERANK], root)


@pytest.fixture(scope="module")
def st(built: Built) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(built.embed_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def cross_encoder(built: Built) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(built.rerank_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def reference(st: Any) -> dict[str, np.ndarray]:
    """sentence-transformers' vector of each of TEXTS."""
    vectors = st.encode(TEXTS, convert_to_numpy=True, batch_size=64)
    return dict(zip(TEXTS, vectors, strict=False))


@pytest.fixture(scope="module")
def servers(built: Built) -> Iterator[dict[str, Server]]:
    """Started at once (they load in parallel): the two-model server, a single-engine server with tight
    limits, one for load and metrics, and one that the SIGTERM test stops."""
    logs = built.root / "logs"
    logs.mkdir(exist_ok=True)
    embed, rerank = str(built.embed_dir), str(built.rerank_dir)
    quiet = ["--log-level", "warning", "--engine-threads", "1"]
    wanted = {
        "pair": Server([embed, rerank, *quiet], logs / "pair.log"),
        "limits": Server(
            [embed, *quiet, "--max-client-batch-size", "4", "--max-concurrent-requests", "2", "--payload-limit", "5000"],
            logs / "limits.log",
        ),
        "load": Server([embed, *quiet], logs / "load.log"),
        "drain": Server([embed, *quiet], logs / "drain.log"),
    }
    try:
        with ThreadPoolExecutor(len(wanted)) as pool:
            for future in [pool.submit(s.start, START_TIMEOUT_S) for s in wanted.values()]:
                future.result()
        yield wanted
    finally:
        for server in wanted.values():
            server.stop()


def ok_json(response: httpx.Response) -> Any:
    assert response.status_code == 200, f"{response.request.url.path}: {response.status_code} {response.text}"
    return response.json()


def same_rows(got: Any, expected: np.ndarray, atol: float = 1e-5) -> bool:
    """`got` (rows as lists) has the shape of `expected` and every value within `atol`."""
    got = np.asarray(got, dtype=np.float64)
    return got.shape == expected.shape and float(np.abs(got - expected).max()) <= atol


def rows_of(answer: Any) -> np.ndarray:
    """The vectors of a /v1/embeddings answer, in input order (checks the indices)."""
    data = answer["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return np.array([d["embedding"] for d in data])


# --- 1. two models, one server: which model a request means -----------------------------------
def test_routing_between_two_models(servers: dict[str, Server], st: Any, cross_encoder: Any) -> None:
    texts = TEXTS[:6]
    query = "where is the capital of france"
    with httpx.Client(base_url=servers["pair"].base_url, timeout=60) as http:
        listed = ok_json(http.get("/v1/models"))
        assert {(m["id"], m["task"]) for m in listed["data"]} == {(EMBED, "embed"), (RERANK, "rerank")}

        info = ok_json(http.get("/info/models"))
        assert {(m["model_id"], m["task"]) for m in info["models"]} == {(EMBED, "embed"), (RERANK, "rerank")}
        assert all("routes" in m for m in info["models"])
        # /info: TEI's shape, of the model POST / serves (the first)
        assert ok_json(http.get("/info"))["model_id"] == info["models"][0]["model_id"]
        assert [ok_json(http.get(f"/{m['model_id']}/info")) for m in info["models"]] == info["models"]
        assert http.get("/no-such-model/info").status_code == 404

        expected = st.encode(texts, convert_to_numpy=True)
        # no `model`: the only model whose task fits the route
        assert_close_rows(
            rows_of(ok_json(http.post("/v1/embeddings", json={"input": texts}))), expected, what="/v1/embeddings without model"
        )
        scores = ok_json(http.post("/rerank", json={"query": query, "texts": texts}))
        assert [s["index"] for s in scores] == list(range(len(texts)))
        want = cross_encoder.predict([(query, t) for t in texts])
        np.testing.assert_allclose([s["score"] for s in scores], want, atol=SCORE_ATOL)

        # `model` picks: the embedder on its route, the reranker is refused there (400 naming its routes)
        assert_close_rows(
            rows_of(ok_json(http.post("/v1/embeddings", json={"input": texts, "model": EMBED}))), expected, what="model=embedder"
        )
        wrong = http.post("/v1/embeddings", json={"input": texts, "model": RERANK})
        assert wrong.status_code == 400, wrong.text
        assert "/rerank" in wrong.json()["error"]["message"]
        # /tokenize fits both: without `model` it is ambiguous (422), with one it answers
        ambiguous = http.post("/tokenize", json={"inputs": "hello"})
        assert ambiguous.status_code == 422 and EMBED in ambiguous.text and RERANK in ambiguous.text, ambiguous.text
        ok_json(http.post("/tokenize", json={"inputs": "hello", "model": RERANK}))

        # path prefixes
        assert_close_rows(ok_json(http.post(f"/{EMBED}/embed", json={"inputs": texts})), expected, what=f"/{EMBED}/embed")
        assert_close_rows(
            rows_of(ok_json(http.post(f"/{EMBED}/v1/embeddings", json={"input": texts}))), expected, what=f"/{EMBED}/v1/embeddings"
        )
        prefixed = ok_json(http.post(f"/{RERANK}/rerank", json={"query": query, "texts": texts}))
        np.testing.assert_allclose([s["score"] for s in prefixed], want, atol=SCORE_ATOL)

        misrouted = http.post(f"/{RERANK}/embed", json={"inputs": texts})
        assert misrouted.status_code == 400, misrouted.text
        body = misrouted.json()
        assert body["error_type"] == "wrong_route"
        for route in ("/rerank", "/v1/rerank", "/predict"):
            assert route in body["error"], body

        unknown = http.post("/no-such-model/embed", json={"inputs": texts})
        assert unknown.status_code == 404, unknown.text
        assert unknown.json()["error_type"] == "model_not_found"
        assert EMBED in unknown.json()["error"] and RERANK in unknown.json()["error"]


# --- 2. /v1/search == embed + cosine top_k + rerank, by hand ----------------------------------
def test_search_equals_the_pipeline_by_hand(servers: dict[str, Server]) -> None:
    documents = make_texts(2, 30, 4, 18)
    query = "which river flows toward the ocean near the city"
    top_k = 5
    with httpx.Client(base_url=servers["pair"].base_url, timeout=60) as http:
        vectors = rows_of(ok_json(http.post("/v1/embeddings", json={"input": [query, *documents]})))
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        cosines = vectors[1:] @ vectors[0]
        candidates = [int(i) for i in np.argsort(-cosines, kind="stable")[:top_k]]
        gaps = np.diff(np.sort(cosines)[::-1][: top_k + 1])
        assert np.all(np.abs(gaps) > 1e-6), "near-tied cosines: the order would not be a fair check"

        plain = http.post("/v1/search", json={"query": query, "documents": documents, "top_k": top_k, "rerank": False})
        got = ok_json(plain)
        assert [r["index"] for r in got] == candidates
        np.testing.assert_allclose([r["score"] for r in got], cosines[candidates], atol=SCORE_ATOL)
        assert "text" not in got[0]
        assert float(plain.headers["x-embed-time"]) >= 0 and "x-rerank-time" in plain.headers

        scores = ok_json(http.post("/rerank", json={"query": query, "texts": [documents[i] for i in candidates]}))
        by_hand = sorted(((candidates[s["index"]], s["score"]) for s in scores), key=lambda pair: -pair[1])

        reranked = http.post(
            "/v1/search", json={"query": query, "documents": documents, "top_k": top_k, "rerank": True, "return_text": True}
        )
        got = ok_json(reranked)
        assert [r["index"] for r in got] == [i for i, _ in by_hand]
        np.testing.assert_allclose([r["score"] for r in got], [s for _, s in by_hand], atol=SCORE_ATOL)
        assert [r["text"] for r in got] == [documents[i] for i, _ in by_hand]
        for header in ("x-embed-time", "x-rerank-time", "x-compute-tokens", "x-total-time"):
            assert header in reranked.headers, header
        assert float(reranked.headers["x-rerank-time"]) > 0


# --- 3. limits: client batch size, payload, concurrency ----------------------------------------
def test_limits(servers: dict[str, Server], st: Any) -> None:
    base_url = servers["limits"].base_url
    with httpx.Client(base_url=base_url, timeout=60) as http:
        five = http.post("/embed", json={"inputs": TEXTS[:5]})
        assert five.status_code == 422, five.text
        assert "5" in five.json()["error"] and "4" in five.json()["error"], five.text
        ok_json(http.post("/embed", json={"inputs": TEXTS[:4]}))

        big = http.post("/embed", json={"inputs": "paint " * 1000})
        assert big.status_code == 413, big.text
        assert big.json()["error_type"] == "payload_limit"

    texts = make_texts(3, 80, 12, 20)  # long-ish: each request holds the engine a little while
    expected = st.encode(texts, convert_to_numpy=True, batch_size=64)

    async def burst() -> list[tuple[list[int], httpx.Response]]:
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=20)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            plans = [[(4 * r + k) % len(texts) for k in range(4)] for r in range(20)]
            answers = await asyncio.gather(*(client.post("/embed", json={"inputs": [texts[i] for i in p]}) for p in plans))
            return list(zip(plans, answers, strict=False))

    statuses: list[int] = []
    for _ in range(3):  # a loaded machine might serialize one burst; three are plenty
        for plan, response in asyncio.run(burst()):
            statuses.append(response.status_code)
            if response.status_code == 200:
                assert_close_rows(response.json(), expected[plan], what="200 under load")
            else:
                assert response.status_code == 429, response.text
                assert response.json()["error_type"] == "overloaded"
                assert response.headers.get("retry-after") == "1"
        if 429 in statuses:
            break
    assert 429 in statuses, f"no 429 with --max-concurrent-requests 2: {statuses}"
    assert 200 in statuses, statuses


# --- in-process servers whose backend we control ------------------------------------------------
@dataclass
class Probe:
    """Wraps a loaded engine's `backend.infer`: records the rows it sees (ids without padding) and the
    calls (`calls`: the rows of each), raises on `fail_id`, blocks on `block_id` until `gate` is set,
    takes `delay` seconds more per call (an engine as slow as a large model's)."""

    fail_id: int | None = None
    block_id: int | None = None
    delay: float = 0.0
    calls: list[list[tuple[int, ...]]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    blocked: threading.Event = field(default_factory=threading.Event)
    rows: list[tuple[int, ...]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, engine: Any) -> Any:
        inner = engine.backend.infer

        def infer(batch: Any) -> Any:
            seen = [tuple(int(t) for t in row[:n]) for row, n in zip(batch.input_ids, batch.lengths, strict=False)]
            with self.lock:
                self.rows.extend(seen)
                self.calls.append(seen)
            time.sleep(self.delay)
            if self.fail_id is not None and (batch.input_ids == self.fail_id).any():
                raise RuntimeError("injected engine failure")
            if self.block_id is not None and (batch.input_ids == self.block_id).any():
                self.blocked.set()
                self.gate.wait(60)
            return inner(batch)

        engine.backend.infer = infer  # the batcher calls `backend.infer`: the instance attribute wins
        return engine


@contextlib.contextmanager
def inprocess_server(engine_dir: Path, probe: Probe, **settings: Any) -> Iterator[tuple[str, Any]]:
    """The real app under uvicorn on a thread, its engine's backend wrapped by `probe`, with
    `ServeSettings(**settings)`; yields (base URL, AppState) once /health answers 200."""
    import uvicorn

    from bei.api.app import create_app, state_for_engines
    from bei.settings import ServeSettings
    from bei.targets.loading import load_engine

    state = state_for_engines([engine_dir], ServeSettings(log_level="warning", **settings))
    for model in state.models.values():
        model.load = lambda: probe.wrap(load_engine(engine_dir, threads=1))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(base_url), 60, "the in-process server is not healthy")
        yield base_url, state
    finally:
        probe.gate.set()
        server.should_exit = True
        thread.join(30)
        if thread.is_alive():
            server.force_exit = True
            thread.join(10)
        sock.close()


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (after {timeout:.0f}s)")
        time.sleep(0.02)


def token_id(engine_dir: Path, token: str) -> int:
    from tokenizers import Tokenizer

    found = Tokenizer.from_file(str(engine_dir / "tokenizer.json")).token_to_id(token)
    assert found is not None, token
    return found


# --- 4. a failing engine call: 424, and the server keeps serving --------------------------------
def test_engine_failure_is_424_and_the_server_keeps_serving(built: Built, st: Any) -> None:
    marker = token_id(built.embed_dir, "[MASK]")
    probe = Probe(fail_id=marker)
    texts = TEXTS[:5]
    with inprocess_server(built.embed_dir, probe) as (base_url, _), httpx.Client(base_url=base_url, timeout=60) as http:
        failed = http.post("/embed", json={"inputs": [texts[0], "boom [MASK] boom"]})
        assert failed.status_code == 424, failed.text
        body = failed.json()
        assert set(body) == {"error", "error_type"} and body["error_type"] == "backend", body
        assert "injected engine failure" in body["error"]
        assert any(marker in row for row in probe.rows), "the marker never reached the backend"

        openai_style = http.post("/v1/embeddings", json={"input": "boom [MASK]"})
        assert openai_style.status_code == 424, openai_style.text
        assert openai_style.json()["error"]["code"] == 424

        after = http.post("/embed", json={"inputs": texts})
        assert_close_rows(ok_json(after), st.encode(texts, convert_to_numpy=True), what="after the failure")
        assert _healthy(base_url)


# --- 5. a client that disconnects while queued: its inputs never reach the engine ---------------
def test_disconnected_client_leaves_the_queue(built: Built, st: Any) -> None:
    from tokenizers import Tokenizer

    marker = token_id(built.embed_dir, "[MASK]")
    probe = Probe(block_id=marker)
    text_a = "occupy [MASK] the engine"
    text_b = "this text is queued while its client gives up"
    ids_b = tuple(Tokenizer.from_file(str(built.embed_dir / "tokenizer.json")).encode(text_b).ids)

    with inprocess_server(built.embed_dir, probe) as (base_url, state), ThreadPoolExecutor(2) as pool:
        service = state.models[EMBED].service
        request_a = pool.submit(httpx.post, f"{base_url}/embed", json={"inputs": [text_a]}, timeout=90)
        assert probe.blocked.wait(30), "request A never reached the engine"

        def post_b() -> str:
            try:
                response = httpx.post(f"{base_url}/embed", json={"inputs": [text_b]}, timeout=4)
            except httpx.TimeoutException:
                return "timed out"
            return f"answered {response.status_code}"

        request_b = pool.submit(post_b)
        wait_until(lambda: len(service.batcher.queue) >= 1, 4, "request B was never queued")
        assert request_b.result(timeout=30) == "timed out"
        wait_until(lambda: state.metrics.requests[("/embed", 499)] >= 1, 15, "the server did not notice that client B went away")
        probe.gate.set()

        answer_a = request_a.result(timeout=60)
        assert_close_rows(ok_json(answer_a), st.encode([text_a], convert_to_numpy=True), what="request A")
        wait_until(lambda: len(service.batcher.queue) == 0, 15, "the queue did not drain")
        after = httpx.post(f"{base_url}/embed", json={"inputs": TEXTS[:3]}, timeout=60)
        assert_close_rows(ok_json(after), st.encode(TEXTS[:3], convert_to_numpy=True), what="after B left")

    with probe.lock:
        seen = list(probe.rows)
    assert any(marker in row for row in seen)
    assert ids_b not in seen, "the engine computed the inputs of a client that had disconnected"


# --- 5b. abandoned heavy requests: their work is dropped before it runs -------------------------
def _post_and_keep_open(base_url: str, path: str, body: Any) -> socket.socket:
    """A whole POST sent on a raw socket whose answer nobody reads: close it to hang up."""
    data = orjson.dumps(body)
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def test_abandoned_requests_are_dropped_before_they_run(built: Built) -> None:
    """Eight heavy requests (one engine call each, on an engine slowed to `delay` a call) whose clients
    hang up while the second runs: that call finishes, the one prepared meanwhile and the queued ones
    never run (bei_dropped_inputs_total counts them), and a small request is answered within about one
    call, not after all of them."""
    from tokenizers import Tokenizer

    delay, count, rows = 0.5, 8, 256  # 256 rows of 64 tokens: one engine call of the default budget each
    tokenizer = Tokenizer.from_file(str(built.embed_dir / "tokenizer.json"))
    heavy = [[f"abandoned request {r} holds text {i} " * 6 for i in range(rows)] for r in range(count)]
    marks = [tuple(tokenizer.encode(texts[0]).ids[:6]) for texts in heavy]

    def heavy_calls() -> list[list[tuple[int, ...]]]:
        with probe.lock:
            return [call for call in probe.calls if any(row[:6] in marks for row in call)]

    probe = Probe(delay=delay)
    with inprocess_server(built.embed_dir, probe, max_batch_requests=rows) as (base_url, state):
        service = state.models[EMBED].service
        started = time.perf_counter()
        small = httpx.post(f"{base_url}/embed", json={"inputs": ["a small request"]}, timeout=60)
        idle = time.perf_counter() - started
        assert small.status_code == 200
        tokenized = service.tokenization_time.snapshot()[2]
        sockets = [_post_and_keep_open(base_url, "/embed", {"inputs": heavy[r], "truncate": True}) for r in range(count)]
        wait_until(lambda: service.tokenization_time.snapshot()[2] == tokenized + count, 60, "the heavy requests were not tokenized")
        wait_until(lambda: len(heavy_calls()) >= 2, 60, "the second heavy request never reached the engine")
        for sock in sockets:
            sock.close()
        wait_until(lambda: state.in_flight == 0, 30, "the server did not notice the hang-ups")
        assert state.metrics.requests[("/embed", 499)] >= count - 2  # the first may have been answered before
        ran = len(heavy_calls())  # the calls begun before the hang-ups, the one running then included
        started = time.perf_counter()
        after = httpx.post(f"{base_url}/embed", json={"inputs": ["a small request"]}, timeout=60)
        latency = time.perf_counter() - started
        assert after.status_code == 200
        np.testing.assert_allclose(np.array(after.json()), np.array(small.json()), rtol=1e-5, atol=1e-6)
        wait_until(lambda: len(service.batcher.queue) == 0, 15, "the queue did not drain")
        time.sleep(2 * delay)  # a call prepared for them, were it to run, would have begun by now
        dropped = metric_value(httpx.get(f"{base_url}/metrics", timeout=10).text, "bei_dropped_inputs_total")
    calls = heavy_calls()
    assert ran < count and len(calls) == ran, f"{len(calls) - ran} engine calls ran after their clients had gone"
    assert dropped == count * rows - sum(len(call) for call in calls)
    abandoned_work = (count - ran) * delay  # what running the abandoned calls would have taken
    assert latency < abandoned_work / 2 + 1, f"a small request took {latency:.2f}s after the hang-ups (idle: {idle:.3f}s)"


def test_an_abandoned_request_stops_being_tokenized(built: Built) -> None:
    """A request of 2048 long inputs whose client hangs up while it is tokenized: the tokenizer thread
    stops at its next input, so a small request does not wait for the rest of it."""
    texts = [f"a long input number {i} that the tokenizer cuts to the model's limit " * 12 for i in range(2048)]
    with inprocess_server(built.embed_dir, Probe()) as (base_url, state):
        started = time.perf_counter()
        whole = httpx.post(f"{base_url}/embed", json={"inputs": texts, "truncate": True}, timeout=120)
        full = time.perf_counter() - started  # tokenizing it, and its engine calls
        assert whole.status_code == 200
        tokenized = state.models[EMBED].service.tokenization_time.snapshot()[2]
        sock = _post_and_keep_open(base_url, "/embed", {"inputs": texts, "truncate": True})
        time.sleep(full / 10)  # its body is read and its tokenization under way
        sock.close()
        wait_until(lambda: state.metrics.requests[("/embed", 499)] >= 1, 30, "the server did not notice the hang-up")
        started = time.perf_counter()
        after = httpx.post(f"{base_url}/embed", json={"inputs": ["a small request"]}, timeout=60)
        latency = time.perf_counter() - started
        assert after.status_code == 200
        finished = state.models[EMBED].service.tokenization_time.snapshot()[2] - tokenized
    assert finished == 1, f"{finished} tokenizations finished: the abandoned one ran to its end"  # the small request's only
    assert latency < full / 2, f"a small request took {latency:.2f}s after the hang-up; the whole request took {full:.2f}s"


# --- 6. SIGTERM under load: drain, then exit 0 ---------------------------------------------------
def test_sigterm_drains_under_load(servers: dict[str, Server], reference: dict[str, np.ndarray]) -> None:
    """SIGTERM after 30 answers, 8 clients sending: what was sent is answered (200, right vectors, or
    503 once draining), nothing sent gets a broken connection, /health says 503, the process exits 0.

    Each client behaves as a load balancer does: after its first 503 (or a refused connection) it
    sends this server nothing more. A client that kept opening connections until the very end would
    race the closing listener: a connection the kernel completed but the server never accepted is
    reset (httpx.ReadError) when the listening socket closes, whatever the server does.
    """
    server = servers["drain"]
    process = server.process
    assert process is not None
    expected = np.stack([reference[t] for t in TEXTS])
    rng = random.Random(6)
    plans = [[rng.randrange(len(TEXTS)) for _ in range(rng.randint(1, 8))] for _ in range(150)]
    outcomes: dict[str, int] = {"200": 0, "503": 0, "refused": 0}
    broken: list[str] = []
    wrong: list[str] = []
    health_statuses: list[int] = []
    signalled = threading.Event()

    async def run() -> None:
        pending = list(enumerate(plans))
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        done = asyncio.Event()

        async def worker(client: httpx.AsyncClient) -> None:
            while pending:
                number, plan = pending.pop(0)
                sent_after = signalled.is_set()
                try:
                    response = await client.post("/embed", json={"inputs": [TEXTS[i] for i in plan]})
                except httpx.ConnectError:
                    outcomes["refused"] += 1
                    return
                except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as err:
                    broken.append(f"request {number} (sent {'after' if sent_after else 'before'} SIGTERM): {err!r}")
                    return
                if response.status_code == 200:
                    outcomes["200"] += 1
                    if not same_rows(response.json(), expected[plan]):
                        wrong.append(f"request {number}: wrong vectors")
                    if outcomes["200"] >= 30 and not signalled.is_set():
                        signalled.set()
                        process.send_signal(signal.SIGTERM)
                elif response.status_code == 503:
                    outcomes["503"] += 1
                    assert response.json()["error_type"] == "unhealthy"
                    return
                else:
                    wrong.append(f"request {number}: {response.status_code} {response.text}")

        async def poll_health() -> None:
            # until the server has gone, or the workers are done and the drain's 503 was seen: the
            # workers stop at their first 503, often before this poller's next answer comes back
            async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as health:
                while not (done.is_set() and 503 in health_statuses):
                    try:
                        health_statuses.append((await health.get("/health")).status_code)
                    except httpx.TransportError:
                        if signalled.is_set():
                            return
                    await asyncio.sleep(0.01)

        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as client:
            poller = asyncio.ensure_future(poll_health())
            await asyncio.gather(*(worker(client) for _ in range(8)))
            done.set()
            await poller

    asyncio.run(asyncio.wait_for(run(), 90))
    assert signalled.is_set(), f"fewer than 30 requests completed: {outcomes}"
    returncode = process.wait(timeout=40)
    unsent = len(plans) - sum(outcomes.values()) - len(broken) - len(wrong)
    print(f"\nSIGTERM under load: {outcomes}, {unsent} not sent; /health statuses seen: {sorted(set(health_statuses))}")
    assert not wrong, wrong[:5]
    assert not broken, f"{len(broken)} requests lost their connection: {broken[:5]}"
    assert outcomes["200"] >= 30 and outcomes["503"] >= 1, outcomes
    assert 503 in health_statuses, f"/health never answered 503 during the drain: {sorted(set(health_statuses))}"
    assert returncode == 0, f"exit status {returncode}:\n{server.log()[-3000:]}"


# --- 7. load: 2000 requests at concurrency 64, every answer right, none lost ----------------------
def test_load(servers: dict[str, Server]) -> None:
    base_url = servers["load"].base_url
    with httpx.Client(base_url=base_url, timeout=60) as http:  # each text alone: the reference
        alone = np.array([ok_json(http.post("/embed", json={"inputs": t}))[0] for t in TEXTS])
    rng = random.Random(7)
    plans = [[rng.randrange(len(TEXTS)) for _ in range(rng.randint(1, 8))] for _ in range(2000)]
    problems: list[str] = []
    answered = 0

    async def worker(pending: list[tuple[int, list[int]]]) -> None:
        """One of 64 clients, each on its own connection (httpx's shared pool costs O(connections) of
        client CPU per request, which would measure the client rather than the server)."""
        nonlocal answered
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            while pending:
                number, plan = pending.pop()
                if number % 2:
                    response = await client.post("/embed", json={"inputs": [TEXTS[i] for i in plan]})
                else:
                    response = await client.post("/v1/embeddings", json={"input": [TEXTS[i] for i in plan]})
                if response.status_code != 200:
                    problems.append(f"request {number}: {response.status_code} {response.text[:200]}")
                    continue
                got = response.json() if number % 2 else rows_of(response.json())
                if not same_rows(got, alone[plan]):
                    problems.append(f"request {number}: vectors differ from the single-request ones")
                answered += 1

    async def run() -> float:
        pending = list(enumerate(plans))[::-1]
        started = time.perf_counter()
        await asyncio.gather(*(worker(pending) for _ in range(64)))
        return time.perf_counter() - started

    seconds = asyncio.run(asyncio.wait_for(run(), 120))
    inputs = sum(len(p) for p in plans)
    print(
        f"\nload: {len(plans)} requests ({inputs} inputs) at concurrency 64 in {seconds:.1f}s: "
        f"{len(plans) / seconds:.0f} requests/s, {inputs / seconds:.0f} inputs/s"
    )
    assert not problems, problems[:5]
    assert answered == len(plans)


# --- 8. /metrics after traffic ---------------------------------------------------------------------
def test_metrics_after_traffic(servers: dict[str, Server]) -> None:
    with httpx.Client(base_url=servers["load"].base_url, timeout=60) as http:
        for size in (1, 3, 8):
            ok_json(http.post("/embed", json={"inputs": TEXTS[:size]}))
        text = http.get("/metrics").text
    lines = text.splitlines()
    for name in ("bei_batch_size_bucket", "bei_queue_seconds_bucket"):
        assert any(line.startswith(name + "{") for line in lines), f"{name} not in /metrics"
    assert float(next(line for line in lines if line.startswith('bei_batch_size_bucket{le="+Inf"}')).split()[1]) > 0
    count = next(line for line in lines if line.startswith("bei_tokenization_seconds_count "))
    assert float(count.split()[1]) > 0, count


# --- 9. the performance client against the two-model server -------------------------------------
def test_performance_client(servers: dict[str, Server], st: Any, cross_encoder: Any) -> None:
    from bei.client import Client

    texts = make_texts(9, 100)
    query = "a train ticket to paris"
    with Client(servers["pair"].base_url, batch_size=16, max_concurrency=4, timeout=60) as client:
        vectors = client.embed(texts)
        scores = client.rerank(query, texts[:40])
    assert_close_rows(vectors, st.encode(texts, convert_to_numpy=True, batch_size=64), what="Client.embed")
    np.testing.assert_allclose(scores, cross_encoder.predict([(query, t) for t in texts[:40]]), atol=SCORE_ATOL)


# --- 10. schemathesis: generated requests never get a 500 ------------------------------------------
FUZZED = {"/v1/embeddings", "/embed", "/rerank", "/v1/rerank", "/predict", "/tokenize", "/v1/search"}


def test_schemathesis_finds_no_server_errors(servers: dict[str, Server]) -> None:
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (the test extra has it)")
    import requests  # schemathesis' transport
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    base_url = servers["pair"].base_url
    spec = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    failures: list[str] = []
    tried: dict[str, int] = {}
    session = requests.Session()

    def fuzzer(operation: Any, mode: Any, examples: int) -> Callable[[], None]:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            response = case.call(base_url=base_url, session=session, timeout=30)
            key = f"{mode.value} {operation.path}"
            tried[key] = tried.get(key, 0) + 1
            if response.status_code >= 500:
                failures.append(f"POST {operation.path} {case.body!r}: {response.status_code} {response.text[:300]}")

        return fuzz

    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() == "POST" and operation.path in FUZZED:
            fuzzer(operation, GenerationMode.POSITIVE, 20)()  # valid bodies
            fuzzer(operation, GenerationMode.NEGATIVE, 10)()  # bodies that break the schema
    session.close()
    print(f"\nschemathesis {schemathesis.__version__}: requests per route {tried}")
    fuzzed = {key.split()[1] for key in tried}
    assert fuzzed == FUZZED, f"routes not fuzzed: {FUZZED - fuzzed}"
    assert not failures, "\n".join(failures[:10])
