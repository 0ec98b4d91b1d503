"""`bei serve --ray --replicas 2` (bei/ray_serve.py) on a local Ray with 2 CPUs: bei's own app answers through
Ray Serve's proxy, from both replicas, with the vectors of the engine."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bei.settings import ServeSettings
from bei.testing.inproc_server import make_and_build

pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-serve")
    _, folder, _ = make_and_build(str(root), "tiny-serve-ray", "bert", "embed", {"normalize": True}, {"target": "onnxruntime"})
    return Path(folder)


@pytest.fixture()
def served(engine: Path) -> Iterator[str]:
    import ray

    from bei.ray_serve import start

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        settings = ServeSettings.model_validate({"host": "127.0.0.1", "port": port, "engine_threads": 1, "api_key": "s3cret"})
        start([engine], settings, replicas=2, num_cpus=0.5, blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_two_replicas_serve_the_engine(served: str, engine: Path) -> None:
    from bei.backend import Batch
    from bei.targets.loading import load_engine

    texts = ["Hello world", "A second text", "alpha beta gamma"]
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=served, timeout=30, headers={"authorization": "Bearer s3cret"}) as client:
        while time.monotonic() < deadline:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        answers = [client.post("/embed", json={"inputs": texts}) for _ in range(8)]
        info = client.get("/info")
        refused = client.post("/embed", json={"inputs": texts}, headers={"authorization": "Bearer wrong"})
    assert refused.status_code == 401  # bei's own API-key guard, in every replica
    assert info.status_code == 200 and info.json()["model_id"]
    assert all(a.status_code == 200 for a in answers), answers[0].text
    loaded = load_engine(engine, threads=1)
    want = loaded.backend.infer(Batch.pad([loaded.tokenizer.encode(t, truncate=True) for t in texts], loaded.tokenizer.pad_id))
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    for answer in answers:
        np.testing.assert_allclose(np.array(answer.json()), want, rtol=1e-4, atol=1e-5)
    status = serve.status().applications["bei"].deployments["bei"]
    assert status.replica_states.get("RUNNING") == 2
