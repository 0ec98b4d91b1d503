"""Texts -> the vectors the server would answer: the model's default prompt (or --prompt-name), then
`bei.api.embeddings.finish` (normalization, Matryoshka dimensions) as POST /v1/embeddings does.

A bge-m3 engine (task embed_m3) gives its dense vectors (`dense_rows`, as /v1/embeddings reads them) and,
with --sparse, its lexical weights (`lexical_weights`, as /embed_sparse answers them: no prompt) as a
`sparse` column of (index, value) structs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from bei.api.embeddings import dense_rows, finish, prompt_text
from bei.api.m3 import lexical_weights
from bei.batch.options import EmbedOptions, EngineOptions
from bei.batch.parts import sparse_array
from bei.batch.sources import Rows
from bei.batch.worker import Columns, Worker
from bei.errors import ValidationError
from bei.kinds import Task


class Embedder(Worker):
    tasks = (Task.EMBED, Task.EMBED_M3)
    command = "bei embed"
    options: EmbedOptions

    def __init__(self, engine_dir: Path, options: EmbedOptions) -> None:
        super().__init__(engine_dir, options)
        self.prompt = prompt_text(self.service, options.prompt_name)
        self.normalize = self.manifest.normalize if options.normalize is None else options.normalize

    @classmethod
    def check_task(cls, engine_dir: Path, task: Task, options: EngineOptions) -> None:
        super().check_task(engine_dir, task, options)
        if isinstance(options, EmbedOptions) and options.sparse and task is not Task.EMBED_M3:
            raise ValidationError(
                f"--sparse: {engine_dir} is a {task.value!r} engine; lexical weights come from an 'embed_m3' (bge-m3) engine"
            )

    def embed(self, texts: list[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """float32 [len(texts), dim], in the order of `texts`; `progress(rows)` as windows of texts are done."""
        return self._dense(self.engine_outputs(texts, self.prompt, progress)[1] if texts else [])

    def _dense(self, outputs: list[np.ndarray]) -> np.ndarray:
        """float32 [rows, dim]: the engine's output rows as /v1/embeddings answers them."""
        if not outputs:
            dim = self.options.dimensions or self.manifest.embedding_dim or 0
            return np.zeros((0, dim), np.float32)
        vectors = dense_rows(self.service, outputs).astype(np.float32, copy=False)
        return finish(vectors, normalize=self.normalize, dimensions=self.options.dimensions, full_dim=vectors.shape[1])

    def run(self, rows: Rows, progress: Callable[[int], None] | None = None) -> Columns:
        """`embedding` (and `sparse`) of the rows, in their order; `progress(rows)` as windows of texts are done."""
        encoded, outputs = self.engine_outputs(rows.texts, self.prompt, progress) if rows.texts else ([], [])
        columns: Columns = {"embedding": self._dense(outputs)}
        if self.options.sparse:
            if self.prompt is not None and rows.texts:  # /embed_sparse applies no prompt
                encoded, outputs = self.engine_outputs(rows.texts)
            columns["sparse"] = sparse_array([lexical_weights(self.service, e, row) for e, row in zip(encoded, outputs, strict=True)])
        return columns
