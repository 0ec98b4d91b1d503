"""Texts -> the vectors the server would answer: the model's default prompt (or --prompt-name), then
`bei.api.embeddings.finish` (normalization, Matryoshka dimensions) as POST /v1/embeddings does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from bei.api.embeddings import finish, prompt_text
from bei.batch.options import EmbedOptions
from bei.batch.sources import Rows
from bei.batch.worker import Worker
from bei.kinds import Task


class Embedder(Worker):
    task = Task.EMBED
    command = "bei embed"
    column = "embedding"
    options: EmbedOptions

    def __init__(self, engine_dir: Path, options: EmbedOptions) -> None:
        super().__init__(engine_dir, options)
        self.prompt = prompt_text(self.service, options.prompt_name)
        self.normalize = self.manifest.normalize if options.normalize is None else options.normalize

    def embed(self, texts: list[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """float32 [len(texts), dim], in the order of `texts`; `progress(rows)` as windows of texts are done."""
        if not texts:
            dim = self.options.dimensions or self.manifest.embedding_dim or 0
            return np.zeros((0, dim), np.float32)
        vectors = self.engine_rows(texts, self.prompt, progress)
        return finish(vectors, normalize=self.normalize, dimensions=self.options.dimensions, full_dim=vectors.shape[1])

    def run(self, rows: Rows, progress: Callable[[int], None] | None = None) -> np.ndarray:
        return self.embed(rows.texts, progress)
