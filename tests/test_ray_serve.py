"""`bei serve --ray` (bei/ray_serve/) on a local Ray with 2 CPUs: bei's own app answers through Ray Serve's proxy
from 2 replicas with the bodies of `bei serve`, keeps answering while a replica is killed (Serve brings it back),
serves every replica's metrics at /metrics, and passes the autoscaling flags to the deployment.

One Ray and one deployment for the module (a replica loads in seconds on 2 shared cores); the tests run in file
order, the autoscaling redeploy last."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bei.ray_serve.scaling import Scaling
from bei.settings import ServeSettings
from bei.testing.inproc_server import make_and_build, serve_engine

pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow
KEY = "s3cret"
TEXTS = ["Hello world", "A second text", "alpha beta gamma"]
SETTINGS: dict[str, Any] = {"engine_threads": 1, "api_key": KEY}
READY_S = 180.0  # a replica started on 2 shared cores: Ray worker, imports, engine load


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("ray-serve")
    _, embed, _ = make_and_build(str(root), "tiny-serve-ray", "bert", "embed", {"normalize": True}, {"target": "onnxruntime"})
    _, rerank, _ = make_and_build(str(root), "tiny-rerank-ray", "bert", "rerank", {"seed": 1}, {"target": "onnxruntime"})
    return [Path(embed), Path(rerank)]


def _replicas() -> dict[str, str]:
    """Replica id -> state, from the Serve controller (what `serve status` reads)."""
    details = serve.context._get_global_client().get_serve_details()
    return {r["replica_id"]: r["state"] for r in details["applications"]["bei"]["deployments"]["bei"]["replicas"]}


def _wait_running(count: int, client: httpx.Client, gone: str | None = None) -> None:
    """Until `count` replicas are RUNNING (`gone` not among them) and /health answers 200 through the proxy."""
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        running = [r for r, state in _replicas().items() if state == "RUNNING"]
        if len(running) == count and gone not in running:
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"not {count} replicas RUNNING after {READY_S:.0f}s: {_replicas()}")


@pytest.fixture(scope="module")
def served(engines: list[Path]) -> Iterator[httpx.Client]:
    """`bei serve --ray --replicas 2` of both engines, through the proxy on 127.0.0.1."""
    import ray

    from bei.ray_serve import start

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        settings = ServeSettings.model_validate({"host": "127.0.0.1", "port": port, **SETTINGS})
        start(engines, settings, scaling=Scaling(replicas=2), num_cpus=0.5, blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers={"authorization": f"Bearer {KEY}"}) as client:
            _wait_running(2, client)
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(engines: list[Path]) -> Iterator[httpx.Client]:
    """`bei serve` of the same engines, in process."""
    with (
        serve_engine(engines, **SETTINGS) as url,
        httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {KEY}"}) as client,
    ):
        yield client


PER_RESPONSE = {"id"}  # Cohere's response id: new in every answer


def _same(got: Any, want: Any, where: str = "body") -> None:
    """Equal JSON, floats to 1e-5 (one ONNX Runtime engine on either side, batches padded alike), but ids."""
    assert type(got) is type(want), f"{where}: {got!r} != {want!r}"
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            if key in PER_RESPONSE:
                assert type(got[key]) is type(want[key]), f"{where}.{key}"
            else:
                _same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), where
    else:
        assert got == want, where


REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/embeddings", {"input": TEXTS, "model": "tiny-serve-ray"}),
    ("/embed", {"inputs": TEXTS}),
    ("/rerank", {"query": "what is alpha?", "texts": TEXTS, "return_text": True}),
    ("/v1/rerank", {"query": "what is alpha?", "documents": TEXTS, "top_n": 2}),
    ("/v1/embeddings", {"input": "x", "model": "no-such-model"}),  # an error: the same status and body
    ("/rerank", {"query": "q", "texts": []}),
]


def test_same_bodies_as_bei_serve(served: httpx.Client, reference: httpx.Client, engines: list[Path]) -> None:
    for path, body in REQUESTS:
        want = reference.post(path, json=body)
        for _ in range(4):  # both replicas, most likely
            got = served.post(path, json=body)
            assert got.status_code == want.status_code, (path, got.text, want.text)
            _same(got.json(), want.json(), path)
    assert served.post("/embed", json={"inputs": TEXTS}, headers={"authorization": "Bearer wrong"}).status_code == 401

    from bei.backend import Batch
    from bei.targets.loading import load_engine

    loaded = load_engine(engines[0], threads=1)  # and the vectors are the engine's
    want_vectors = loaded.backend.infer(Batch.pad([loaded.tokenizer.encode(t, truncate=True) for t in TEXTS], loaded.tokenizer.pad_id))
    want_vectors = want_vectors / np.linalg.norm(want_vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(np.array(served.post("/embed", json={"inputs": TEXTS}).json()), want_vectors, rtol=1e-4, atol=1e-5)


def _requests_total(client: httpx.Client, route: str) -> tuple[float, set[str]]:
    """bei_requests_total{route, status=200} summed over replicas, and the replicas /metrics labels."""
    text = client.get("/metrics").text
    total, replicas = 0.0, set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            replicas.add(sample.labels["replica"])
            if sample.name == "bei_requests_total" and sample.labels["route"] == route and sample.labels["status"] == "200":
                total += sample.value
    return total, replicas


def test_metrics_of_every_replica(served: httpx.Client) -> None:
    from bei.ray_serve.metrics import PUBLISH_S

    running = {r for r, state in _replicas().items() if state == "RUNNING"}
    before, _ = _requests_total(served, "/similarity")
    sent = 12
    for _ in range(sent):
        assert served.post("/similarity", json={"inputs": {"source_sentence": "a", "sentences": ["b", "c"]}}).status_code == 200
    deadline = time.monotonic() + 6 * PUBLISH_S
    while True:  # each replica publishes every PUBLISH_S: wait for the others' figures
        total, replicas = _requests_total(served, "/similarity")
        if (total - before == sent and replicas == running) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert replicas == running  # every replica's figures, from whichever replica answered
    assert total - before == sent  # the application's count: the sum over replicas


CLIENTS, PER_CLIENT = 4, 20  # a bounded load: 80 requests, 4 in flight, while one replica is killed


def test_answers_while_a_replica_is_killed(served: httpx.Client) -> None:
    import ray

    before = {r for r, state in _replicas().items() if state == "RUNNING"}
    details = serve.context._get_global_client().get_serve_details()
    victim = next(r for r in details["applications"]["bei"]["deployments"]["bei"]["replicas"] if r["state"] == "RUNNING")
    answered: list[int] = []
    retries: list[str] = []

    def load() -> None:  # each request retried (up to 20 times) as a client behind a proxy would
        with httpx.Client(base_url=str(served.base_url), timeout=30, headers=dict(served.headers)) as client:
            for _ in range(PER_CLIENT):
                for _attempt in range(20):
                    try:
                        response = client.post("/v1/embeddings", json={"input": TEXTS, "model": "tiny-serve-ray"})
                        if response.status_code == 200:
                            answered.append(len(response.json()["data"]))
                            break
                        retries.append(f"{response.status_code} {response.text[:80]}")
                    except httpx.TransportError as error:
                        retries.append(repr(error))
                    time.sleep(0.25)

    threads = [threading.Thread(target=load) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(answered) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
    killed_at = len(answered)
    for thread in threads:
        thread.join(240)
    assert not any(thread.is_alive() for thread in threads)
    assert answered == [len(TEXTS)] * CLIENTS * PER_CLIENT, retries  # every request answered, some after retries
    print(f"{len(answered)} requests answered ({len(answered) - killed_at} after the kill), {len(retries)} retries: {retries[:3]}")
    _wait_running(2, served, gone=victim["replica_id"])  # Serve noticed the dead replica and started another
    after = {r for r, state in _replicas().items() if state == "RUNNING"}
    assert victim["replica_id"] not in after and len(after - before) == 1


def test_autoscaling_flags_reach_the_deployment(served: httpx.Client, engines: list[Path]) -> None:
    from bei.ray_serve import APP_NAME, application

    values = {"replicas": None, "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 3.0}
    settings = ServeSettings.model_validate({"host": "127.0.0.1", **SETTINGS})
    app = application(engines, settings, scaling=Scaling.of(values, settings.max_concurrent_requests), num_cpus=0.5)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    details = serve.context._get_global_client().get_serve_details()
    config = details["applications"]["bei"]["deployments"]["bei"]["deployment_config"]
    assert config["autoscaling_config"]["min_replicas"] == 1
    assert config["autoscaling_config"]["max_replicas"] == 2
    assert config["autoscaling_config"]["target_ongoing_requests"] == 3.0
    assert served.post("/embed", json={"inputs": TEXTS}).status_code == 200
