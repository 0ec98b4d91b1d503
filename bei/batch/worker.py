"""An engine loaded once in this process, run by the server's own path on a private event loop.

Inputs go through `InferenceService.run` (tokenization, the token-budget batcher that sorts inputs by length and
runs the engine), a window of them at a time, so that the job's numbers are the server's, row by row. Subclasses
(`Embedder`, `Scorer`) say which task they take and what they make of the engine's rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from bei.batch.options import EngineOptions
from bei.batch.sources import Rows
from bei.errors import ValidationError
from bei.inference import InferenceService
from bei.kinds import Task
from bei.settings import ServeSettings
from bei.targets.loading import load_engine
from bei.text.tokenizer import TextInput

WINDOW = 1024  # inputs submitted to the batcher at a time (it sorts each window by length)
IN_FLIGHT = 2  # windows at a time: the next one tokenizes while the engine runs the current one


class Worker:
    task: ClassVar[Task]
    options: EngineOptions
    command: ClassVar[str]  # bei embed / bei rerank: for the error naming the engine
    column: ClassVar[str]  # the output column of its values

    def __init__(self, engine_dir: Path, options: EngineOptions) -> None:
        engine = load_engine(Path(engine_dir), threads=options.engine_threads)
        self.check_task(engine_dir, engine.manifest.task)
        self.options = options
        self.manifest = engine.manifest
        settings = ServeSettings.model_validate(
            {
                "engine_threads": options.engine_threads,
                "tokenization_workers": options.tokenization_workers,
                "auto_truncate": options.truncate,
            }
        )
        self.truncate = options.truncate
        self._loop = asyncio.new_event_loop()
        self.service = InferenceService(engine, settings)
        self._loop.run_until_complete(self._start())

    @classmethod
    def check_task(cls, engine_dir: Path, task: Task) -> None:
        if task is not cls.task:
            raise ValidationError(f"--engine: {engine_dir} is a {task.value!r} engine; {cls.command} needs a {cls.task.value!r} engine")

    async def _start(self) -> None:
        self.service.start()

    async def _windows(self, items: Sequence[TextInput], prompt: str | None, progress: Callable[[int], None] | None) -> np.ndarray:
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def window(chunk: Sequence[TextInput]) -> np.ndarray:
            async with gate:
                outcome = await self.service.run(list(chunk), truncate=self.truncate, prompt=prompt)
                if progress is not None:
                    progress(len(chunk))
                return np.stack(outcome.rows).astype(np.float32, copy=False)

        chunks = [items[i : i + WINDOW] for i in range(0, len(items), WINDOW)]
        return np.concatenate(await asyncio.gather(*(window(c) for c in chunks)))

    def engine_rows(
        self, items: Sequence[TextInput], prompt: str | None = None, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """The engine's rows for `items` (non-empty), in their order; `progress(n)` as windows are done."""
        return self._loop.run_until_complete(self._windows(items, prompt, progress))

    def run(self, rows: Rows, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """One part's values (rows x ... float32), in the order of its rows."""
        raise NotImplementedError

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.service.stop())
            self._loop.close()
