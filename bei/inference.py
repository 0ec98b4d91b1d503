"""What every route calls: tokenize off the event loop, then batch and run on the engine."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from bei.scheduler.batcher import Batcher, Result
from bei.settings import ServeSettings
from bei.targets.loading import LoadedEngine
from bei.telemetry import TIME_BUCKETS, Histogram
from bei.text.tokenizer import Direction, Encoded, TextInput

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """One request's inputs as encoded, their output rows in input order, and where the time went."""

    encoded: list[Encoded]
    rows: list[np.ndarray]
    queue_time: float
    inference_time: float

    @property
    def tokens(self) -> int:
        return sum(len(e) for e in self.encoded)


class InferenceService:
    def __init__(self, engine: LoadedEngine, settings: ServeSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.max_batch_tokens = settings.max_batch_tokens or engine.manifest.max_num_tokens
        self.max_batch_requests = settings.max_batch_requests or engine.manifest.max_batch_size
        self.tokenization_time = Histogram(TIME_BUCKETS)
        self._tokenizers = ThreadPoolExecutor(settings.tokenization_workers, thread_name_prefix="bei-tokenize")
        self.batcher = Batcher(
            engine.backend,
            pad_id=engine.tokenizer.pad_id,
            padding_side=engine.manifest.padding_side,
            max_batch_tokens=max(self.max_batch_tokens, engine.manifest.max_input_tokens),
            max_batch_requests=self.max_batch_requests,
            per_token_output=engine.per_token_output,
        )

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self._tokenizers.shutdown(wait=False)
        self.engine.backend.close()

    async def encode(
        self,
        items: Sequence[TextInput],
        *,
        truncate: bool = False,
        direction: Direction = "right",
        prompt: str | None = None,
    ) -> list[Encoded]:
        truncate = truncate or self.settings.auto_truncate
        abandoned = threading.Event()  # set when the request goes away: the thread stops at the next input

        def work() -> list[Encoded]:
            started = time.perf_counter()
            encoded = []
            for item in items:
                if abandoned.is_set():
                    return []
                encoded.append(self.tokenizer.encode(item, truncate=truncate, direction=direction, prompt=prompt))
            self.tokenization_time.observe(time.perf_counter() - started)
            return encoded

        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenizers, work)
        except asyncio.CancelledError:
            abandoned.set()
            raise

    async def on_tokenizer_thread(self, work: Callable[[], T]) -> T:
        """`work` on the tokenizer threads: tokenizing holds the GIL, the event loop must not wait on it."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizers, work)

    async def infer(self, encoded: Sequence[Encoded]) -> Result:
        return await self.batcher.submit(encoded)

    async def run(
        self,
        items: Sequence[TextInput],
        *,
        truncate: bool = False,
        direction: Direction = "right",
        prompt: str | None = None,
    ) -> Outcome:
        """Tokenize and run: the one path every task route takes to the engine."""
        encoded = await self.encode(items, truncate=truncate, direction=direction, prompt=prompt)
        result = await self.infer(encoded)
        return Outcome(encoded, result.rows, result.queue_time, result.inference_time)

    async def warmup(self) -> None:
        """One call through the whole path, so the first request does not pay for lazy setup."""
        await self.infer(await self.encode(["warm up"], truncate=True))
