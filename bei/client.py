"""A high-throughput client for bei, BEI and TEI servers.

Splits large inputs into batches, sends them with bounded concurrency, retries 429 / 5xx with
exponential backoff and jitter (honouring Retry-After), keeps the input order and returns numpy
arrays. `Client` is synchronous (it runs the async client on a private event loop); `AsyncClient`
is for code that already has one.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np

T = TypeVar("T")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class ClientError(Exception):
    """A request that failed for good: the status and the server's error body."""

    def __init__(self, status: int, body: str, path: str) -> None:
        super().__init__(f"{path} answered {status}: {body}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.1
    max_delay: float = 5.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_delay)
            except ValueError:
                pass
        ceiling = min(self.max_delay, self.base_delay * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)  # jitter spreads retries of many clients


def batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class AsyncClient:
    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        batch_size: int = 32,
        max_concurrency: int = 16,
        timeout: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        if api_key is None:  # as `bei serve`: the key from the environment
            api_key = os.environ.get("BEI_API_KEY") or None
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.retry = retry
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def post(self, path: str, payload: Any) -> Any:
        """One request, retried on 408/429/5xx and connection errors; other errors raise ClientError."""
        for attempt in range(self.retry.attempts + 1):
            try:
                response = await self._http.post(path, json=payload)
            except httpx.TransportError:
                if attempt == self.retry.attempts:
                    raise
                await asyncio.sleep(self.retry.delay(attempt, None))
                continue
            if response.status_code < 400:
                return response.json()
            if response.status_code not in RETRY_STATUS or attempt == self.retry.attempts:
                raise ClientError(response.status_code, response.text, path)
            await asyncio.sleep(self.retry.delay(attempt, response.headers.get("retry-after")))
        raise AssertionError("unreachable")

    async def _gather(self, calls: list[Callable[[], Awaitable[T]]]) -> list[T]:
        """Run calls with at most `max_concurrency` in flight; results in call order."""
        gate = asyncio.Semaphore(self.max_concurrency)

        async def run(call: Callable[[], Awaitable[T]]) -> T:
            async with gate:
                return await call()

        return list(await asyncio.gather(*(run(c) for c in calls)))

    async def batch_post(self, path: str, payloads: Sequence[Any]) -> list[Any]:
        """Post each payload to `path` concurrently; answers in payload order."""
        return await self._gather([functools.partial(self.post, path, p) for p in payloads])

    async def embed(self, texts: Sequence[str], *, dimensions: int | None = None) -> np.ndarray:
        """OpenAI /v1/embeddings in base64, as float32 [len(texts), dim]."""

        async def one(chunk: Sequence[str]) -> list[np.ndarray]:
            payload: dict[str, Any] = {"input": list(chunk), "encoding_format": "base64"}
            if self.model:
                payload["model"] = self.model
            if dimensions:
                payload["dimensions"] = dimensions
            answer = await self.post("/v1/embeddings", payload)
            rows = sorted(answer["data"], key=lambda d: d["index"])
            return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in rows]

        parts = await self._gather([functools.partial(one, c) for c in batches(texts, self.batch_size)])
        return np.stack([row for part in parts for row in part]) if texts else np.zeros((0, 0), np.float32)

    async def rerank(self, query: str, texts: Sequence[str], *, raw_scores: bool = False, truncate: bool = True) -> np.ndarray:
        """BEI/TEI /rerank: one score per text, in the texts' order."""

        async def one(chunk: Sequence[str]) -> list[float]:
            payload = {"query": query, "texts": list(chunk), "raw_scores": raw_scores, "truncate": truncate}
            answer = await self.post("/rerank", payload)
            scores = [0.0] * len(chunk)
            for item in answer:
                scores[item["index"]] = item["score"]
            return scores

        parts = await self._gather([functools.partial(one, c) for c in batches(texts, self.batch_size)])
        return np.array([s for part in parts for s in part], dtype=np.float32)

    async def classify(self, texts: Sequence[str], *, raw_scores: bool = False, truncate: bool = True) -> list[list[dict[str, Any]]]:
        """/predict: per text, labels with scores (highest first)."""

        async def one(chunk: Sequence[str]) -> list[list[dict[str, Any]]]:
            payload = {"inputs": [[t] for t in chunk], "raw_scores": raw_scores, "truncate": truncate}
            return list(await self.post("/predict", payload))

        parts = await self._gather([functools.partial(one, c) for c in batches(texts, self.batch_size)])
        return [row for part in parts for row in part]


class Client:
    """The synchronous face of `AsyncClient` (same arguments and methods)."""

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._async = AsyncClient(base_url, **kwargs)

    def _run(self, coro: Awaitable[T]) -> T:
        return self._loop.run_until_complete(coro)

    def embed(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        return self._run(self._async.embed(texts, **kwargs))

    def rerank(self, query: str, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
        return self._run(self._async.rerank(query, texts, **kwargs))

    def classify(self, texts: Sequence[str], **kwargs: Any) -> list[list[dict[str, Any]]]:
        return self._run(self._async.classify(texts, **kwargs))

    def batch_post(self, path: str, payloads: Sequence[Any]) -> list[Any]:
        return self._run(self._async.batch_post(path, payloads))

    def close(self) -> None:
        self._run(self._async.aclose())
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
