"""An engine loaded once in this process, and texts -> vectors by the server's own path.

The texts go through `InferenceService.run` (tokenization, the token-budget batcher that sorts inputs
by length and runs the engine) and `bei.api.embeddings.finish` (normalization) with the model's default
prompt, as POST /v1/embeddings does: the job's vectors are the server's, row by row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bei.api.embeddings import finish, prompt_text
from bei.batch.options import EmbedOptions
from bei.errors import ValidationError
from bei.inference import InferenceService
from bei.kinds import Task
from bei.settings import ServeSettings
from bei.targets.loading import load_engine

WINDOW = 1024  # texts submitted to the batcher at a time (it sorts each window by length)
IN_FLIGHT = 2  # windows at a time: the next one tokenizes while the engine runs the current one


class Embedder:
    def __init__(self, engine_dir: Path, options: EmbedOptions) -> None:
        engine = load_engine(Path(engine_dir), threads=options.engine_threads)
        if engine.manifest.task is not Task.EMBED:
            raise ValidationError(f"--engine: {engine_dir} is a {engine.manifest.task} engine; bei embed needs an embed engine")
        self.options = options
        self.manifest = engine.manifest
        settings = ServeSettings.model_validate(
            {
                "engine_threads": options.engine_threads,
                "tokenization_workers": options.tokenization_workers,
                "auto_truncate": options.truncate,
            }
        )
        self._loop = asyncio.new_event_loop()
        self.service = InferenceService(engine, settings)
        self.prompt = prompt_text(self.service, options.prompt_name)
        self.normalize = self.manifest.normalize if options.normalize is None else options.normalize
        self._loop.run_until_complete(self._start())

    async def _start(self) -> None:
        self.service.start()

    async def _embed(self, texts: list[str], progress: Callable[[int], None] | None) -> np.ndarray:
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def window(chunk: list[str]) -> np.ndarray:
            async with gate:
                outcome = await self.service.run(list(chunk), truncate=self.options.truncate, prompt=self.prompt)
                if progress is not None:
                    progress(len(chunk))
                return np.stack(outcome.rows).astype(np.float32, copy=False)

        chunks = [texts[i : i + WINDOW] for i in range(0, len(texts), WINDOW)]
        return np.concatenate(await asyncio.gather(*(window(c) for c in chunks)))

    def embed(self, texts: list[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """float32 [len(texts), dim], in the order of `texts`; `progress(rows)` as windows of texts are done."""
        if not texts:
            dim = self.options.dimensions or self.manifest.embedding_dim or 0
            return np.zeros((0, dim), np.float32)
        vectors = self._loop.run_until_complete(self._embed(texts, progress))
        return finish(vectors, normalize=self.normalize, dimensions=self.options.dimensions, full_dim=vectors.shape[1])

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.service.stop())
            self._loop.close()
