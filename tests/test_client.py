"""bei.client against the live server (parity, order, batching) and against a flaky server
(retries with backoff on 429/503, immediate failure on 422)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bei.client import AsyncClient, Client, ClientError, RetryPolicy
from tests.servers import Server, free_port

TEXTS = [f"sentence number {i} about {'rivers' if i % 2 else 'mountains'} and {i * 7} stones" for i in range(70)]


def test_sync_embed_matches_sentence_transformers_in_order(minilm_server: Server, st_model: Any) -> None:
    with Client(minilm_server.base_url, batch_size=8, max_concurrency=4) as client:
        got = client.embed(TEXTS)
    want = st_model.encode(TEXTS)
    assert got.shape == want.shape == (70, 384)
    assert (got * want).sum(axis=1).min() >= 0.99999


def test_async_embed_with_dimensions(minilm_server: Server, st_model: Any) -> None:
    async def run() -> np.ndarray:
        async with AsyncClient(minilm_server.base_url, batch_size=16) as client:
            return await client.embed(TEXTS[:20], dimensions=64)

    got = asyncio.run(run())
    want = st_model.encode(TEXTS[:20])[:, :64]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert got.shape == (20, 64) and (got * want).sum(axis=1).min() >= 0.99999


def test_batch_post_keeps_order(minilm_server: Server) -> None:
    payloads = [{"inputs": [TEXTS[i]]} for i in range(12)]
    with Client(minilm_server.base_url, max_concurrency=6) as client:
        answers = client.batch_post("/embed", payloads)
        single = client.batch_post("/embed", [payloads[5]])[0]
    assert len(answers) == 12 and np.allclose(answers[5], single, atol=1e-6)


class Flaky:
    """A server that answers 429, then 503, then 200 to each new request id."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.times: list[float] = []

    async def rerank(self, request: Request) -> JSONResponse:
        body = await request.json()
        key = body["query"]
        self.calls[key] = self.calls.get(key, 0) + 1
        self.times.append(time.monotonic())
        if key == "bad":
            return JSONResponse({"error": "nope", "error_type": "validation"}, status_code=422)
        if self.calls[key] == 1:
            return JSONResponse({"error": "busy", "error_type": "overloaded"}, status_code=429, headers={"Retry-After": "0.05"})
        if self.calls[key] == 2:
            return JSONResponse({"error": "warming", "error_type": "unhealthy"}, status_code=503)
        return JSONResponse([{"index": i, "score": float(i)} for i in reversed(range(len(body["texts"])))])


@pytest.fixture()
def flaky() -> Iterator[tuple[str, Flaky]]:
    state = Flaky()
    app = Starlette(routes=[Route("/rerank", state.rerank, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=10)


def test_retries_429_and_503_then_succeeds_in_order(flaky: tuple[str, Flaky]) -> None:
    url, state = flaky
    with Client(url, retry=RetryPolicy(attempts=3, base_delay=0.01)) as client:
        scores = client.rerank("q", ["a", "b", "c"])
    assert scores.tolist() == [0.0, 1.0, 2.0]  # by index, whatever order the server answered in
    assert state.calls["q"] == 3


def test_client_errors_fail_at_once(flaky: tuple[str, Flaky]) -> None:
    url, state = flaky
    with Client(url, retry=RetryPolicy(attempts=3, base_delay=0.01)) as client, pytest.raises(ClientError) as info:
        client.rerank("bad", ["a"])
    assert info.value.status == 422 and "nope" in info.value.body
    assert state.calls["bad"] == 1


def test_gives_up_after_the_attempts(flaky: tuple[str, Flaky]) -> None:
    url, _ = flaky
    with Client(url, retry=RetryPolicy(attempts=1, base_delay=0.01)) as client, pytest.raises(ClientError) as info:
        client.rerank("q2", ["a"])
    assert info.value.status == 503


def test_bei_embed_command_writes_npy_and_jsonl(minilm_server: Server, st_model: Any, tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    source = tmp_path / "texts.jsonl"
    source.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:40]) + "\n")
    for output in (tmp_path / "out.npy", tmp_path / "out.jsonl"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bei.cli",
                "embed",
                "--url",
                minilm_server.base_url,
                "--input",
                str(source),
                "--output",
                str(output),
                "--batch-size",
                "8",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "40 texts written" in result.stderr and "40/40" in result.stderr
    want = st_model.encode(TEXTS[:40])
    got = np.load(tmp_path / "out.npy")
    assert (got * want).sum(axis=1).min() >= 0.99999
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(40))
    assert np.allclose(np.array([r["embedding"] for r in rows]), got, atol=1e-6)


def test_bei_embed_command_names_a_missing_input(tmp_path: Any) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "bei.cli", "embed", "--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o.npy")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "nope.txt does not exist" in result.stderr
