"""An engine loaded once in this process, run by the server's own path on a private event loop.

Inputs go through `InferenceService.run` (tokenization, the token-budget batcher that sorts inputs by length and
runs the engine), a window of them at a time, so that the job's numbers are the server's, row by row. Subclasses
(`Embedder`, `Scorer`) say which tasks they take and what they make of the engine's rows: the columns of a part.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bei.batch.options import EngineOptions
from bei.batch.sources import Rows
from bei.errors import ValidationError
from bei.inference import InferenceService
from bei.kinds import Task
from bei.settings import ServeSettings
from bei.targets.loading import load_engine
from bei.text.tokenizer import Encoded, TextInput

WINDOW = 1024  # inputs submitted to the batcher at a time (it sorts each window by length)
IN_FLIGHT = 2  # windows at a time: the next one tokenizes while the engine runs the current one
Columns = dict[str, Any]  # a part's output columns, in order: name -> float32 [rows] / [rows, dim] array or a pyarrow array


class Worker:
    tasks: ClassVar[tuple[Task, ...]]  # the engine tasks it runs
    options: EngineOptions
    command: ClassVar[str]  # bei embed / bei rerank: for the error naming the engine

    def __init__(self, engine_dir: Path, options: EngineOptions) -> None:
        engine = load_engine(Path(engine_dir), threads=options.engine_threads)
        self.check_task(engine_dir, engine.manifest.task, options)
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
    def check_task(cls, engine_dir: Path, task: Task, options: EngineOptions) -> None:
        """ValidationError unless the engine's task is one this worker runs with these options."""
        if task not in cls.tasks:
            wanted = " or ".join(repr(t.value) for t in cls.tasks)
            raise ValidationError(f"--engine: {engine_dir} is a {task.value!r} engine; {cls.command} needs a {wanted} engine")

    async def _start(self) -> None:
        self.service.start()

    async def _windows(
        self, items: Sequence[TextInput], prompt: str | None, progress: Callable[[int], None] | None
    ) -> tuple[list[Encoded], list[np.ndarray]]:
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def window(chunk: Sequence[TextInput]) -> tuple[list[Encoded], list[np.ndarray]]:
            async with gate:
                outcome = await self.service.run(list(chunk), truncate=self.truncate, prompt=prompt)
                if progress is not None:
                    progress(len(chunk))
                return outcome.encoded, outcome.rows

        chunks = [items[i : i + WINDOW] for i in range(0, len(items), WINDOW)]
        encoded: list[Encoded] = []
        rows: list[np.ndarray] = []
        for window_encoded, window_rows in await asyncio.gather(*(window(c) for c in chunks)):
            encoded += window_encoded
            rows += window_rows
        return encoded, rows

    def engine_outputs(
        self, items: Sequence[TextInput], prompt: str | None = None, progress: Callable[[int], None] | None = None
    ) -> tuple[list[Encoded], list[np.ndarray]]:
        """Each of `items` (non-empty) as encoded and the engine's output row for it, in their order (a bge-m3
        engine's rows are per token: one length a row); `progress(n)` as windows are done."""
        return self._loop.run_until_complete(self._windows(items, prompt, progress))

    def engine_rows(
        self, items: Sequence[TextInput], prompt: str | None = None, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """The engine's rows for `items` (non-empty), stacked in their order; `progress(n)` as windows are done."""
        return np.stack(self.engine_outputs(items, prompt, progress)[1]).astype(np.float32, copy=False)

    def run(self, rows: Rows, progress: Callable[[int], None] | None = None) -> Columns:
        """One part's output columns (besides `row` and `id`), in the order of its rows."""
        raise NotImplementedError

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.service.stop())
            self._loop.close()
