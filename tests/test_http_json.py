"""Response bodies are rendered by orjson (bei/api/http.py): the same JSON values as starlette's
`json.dumps` rendering, compact and UTF-8; the live server uses it, on uvloop and httptools."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import orjson
from starlette.responses import JSONResponse as StarletteJSONResponse

from bei.api.http import JSONResponse, render_json
from bei.serve import loop_and_http
from bei.targets.onnxruntime.backend import session_options
from tests.servers import Server


def starlette_body(content: Any) -> bytes:
    return bytes(StarletteJSONResponse(content).body)


def test_same_bytes_as_starlette_for_plain_values() -> None:
    content = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": [0.5, -0.25, 0.125, 1.0, 0.0], "index": 0}],
        "model": "Zürich 東京 🚀",
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
        "flags": [True, False, None],
    }
    assert render_json(content) == starlette_body(content)
    assert bytes(JSONResponse(content).body) == starlette_body(content)


def test_same_values_as_starlette_for_embeddings() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((8, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[0, :3] = [1.5e-5, -2.5e-7, 3e-12]  # exponent forms are spelled differently, parsed the same
    content = {"data": [{"embedding": v, "index": i} for i, v in enumerate(vectors.tolist())]}
    assert json.loads(render_json(content)) == json.loads(starlette_body(content))


def test_numpy_float32_arrays_round_trip_exactly() -> None:
    vectors = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    parsed = np.array(json.loads(render_json({"v": vectors}))["v"], dtype=np.float32)
    assert np.array_equal(parsed, vectors)


def test_server_renders_with_orjson(http: httpx.Client) -> None:
    response = http.post("/embed", json={"inputs": ["Hello world.", "Zürich café 東京"]})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == render_json(orjson.loads(response.content))  # compact, as render_json writes it
    bad = http.post("/embed", content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert bad.status_code == 422 and "not valid JSON" in bad.json()["error"]


def test_server_runs_on_uvloop_and_httptools(minilm_server: Server) -> None:
    assert loop_and_http() == ("uvloop", "httptools")
    assert "event loop uvloop, HTTP parser httptools" in minilm_server.log()


def test_onnxruntime_threads_do_not_spin_by_default() -> None:
    assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert session_options(threads=1).intra_op_num_threads == 1
