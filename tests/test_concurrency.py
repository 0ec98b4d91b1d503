"""200 concurrent requests through the live server: every request gets exactly its own vectors, in
order, and the server batched inputs of different requests together."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import numpy as np

from tests.servers import Server, cosine, metric_value

N_REQUESTS = 200
WORDS = (
    "alpha beta gamma delta engine token budget batch queue vector cosine server request latency "
    "throughput model layer attention pooling norm river mountain ocean forest city music paint"
).split()


def make_texts(rng: random.Random, count: int) -> list[str]:
    """Distinct texts from 1 to ~200 tokens (one word is about one token here)."""
    texts = []
    for i in range(count):
        roll = rng.random()  # mostly short, some long: the token count (and the test's time) stays small
        n = rng.randint(1, 8) if roll < 0.5 else rng.randint(8, 60) if roll < 0.9 else rng.randint(60, 195)
        texts.append(f"{i} " + " ".join(rng.choice(WORDS) for _ in range(n)))
    return texts


def test_concurrent_requests_get_their_own_vectors(minilm_server: Server, st_model: Any) -> None:
    rng = random.Random(1234)
    texts = make_texts(rng, 60)
    lengths = [len(st_model.tokenizer(t)["input_ids"]) for t in texts]
    assert min(lengths) <= 5 and 150 <= max(lengths) < 256, (min(lengths), max(lengths))

    with httpx.Client(base_url=minilm_server.base_url, timeout=60) as client:
        # each text alone, one request at a time: the reference of the burst
        alone = np.array([client.post("/embed", json={"inputs": t}).json()[0] for t in texts])
        batches_before = metric_value(client.get("/metrics").text, "bei_batches_total")
    # the single-request vectors are right (vs sentence-transformers) and tell texts apart
    st_vectors = st_model.encode(texts, convert_to_numpy=True, batch_size=32)
    for a, e in zip(alone, st_vectors, strict=False):
        assert cosine(a, e) >= 0.99999
    similarity = alone @ alone.T
    np.fill_diagonal(similarity, -1)
    assert similarity.max() < 0.999, "two texts embed alike: a mix-up would go unnoticed"

    # 200 requests: single strings and lists of 2-3 texts, on both routes
    plans: list[tuple[str, list[int], bool]] = []  # (route, text indexes, as a list?)
    for r in range(N_REQUESTS):
        route = "/embed" if r % 2 else "/v1/embeddings"
        if rng.random() < 0.5:
            plans.append((route, [rng.randrange(len(texts))], False))
        else:
            plans.append((route, [rng.randrange(len(texts)) for _ in range(rng.randint(2, 3))], True))
    n_inputs = sum(len(idx) for _, idx, _ in plans)

    async def one(client: httpx.AsyncClient, route: str, idx: list[int], as_list: bool) -> list[list[float]]:
        payload: Any = [texts[i] for i in idx] if as_list else texts[idx[0]]
        key = "inputs" if route == "/embed" else "input"
        extra = {} if route == "/embed" else {"encoding_format": "float"}
        response = await client.post(route, json={key: payload, **extra})
        assert response.status_code == 200, f"{route}: {response.status_code} {response.text}"
        if route == "/embed":
            return response.json()
        data = response.json()["data"]
        assert [d["index"] for d in data] == list(range(len(idx)))
        return [d["embedding"] for d in data]

    async def burst() -> list[list[list[float]]]:
        limits = httpx.Limits(max_connections=N_REQUESTS, max_keepalive_connections=N_REQUESTS)
        async with httpx.AsyncClient(base_url=minilm_server.base_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, *plan) for plan in plans))

    answers = asyncio.run(burst())

    assert len(answers) == N_REQUESTS
    for r, ((route, idx, _), vectors) in enumerate(zip(plans, answers, strict=False)):
        assert len(vectors) == len(idx), f"request {r}: {len(vectors)} vectors for {len(idx)} inputs"
        for position, (i, vector) in enumerate(zip(idx, vectors, strict=False)):
            c = cosine(vector, alone[i])
            assert c >= 0.99999, f"request {r} ({route}) input {position}: cosine {c:.6f} with its own text's vector"

    with httpx.Client(base_url=minilm_server.base_url, timeout=60) as client:
        batches = metric_value(client.get("/metrics").text, "bei_batches_total") - batches_before
    assert 0 < batches < n_inputs, f"{batches} engine calls for {n_inputs} inputs: no batching across requests"
    # many requests in flight at once share engine calls: well under one call per request
    assert batches < N_REQUESTS, f"{batches} engine calls for {N_REQUESTS} concurrent requests"
