"""(query, text) pairs -> the scores POST /rerank answers: the reranker's logit through a sigmoid
(`bei.api.scoring.activate`), or the logit itself with --raw-scores."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bei.api.scoring import activate
from bei.batch.options import RerankOptions
from bei.batch.sources import Rows
from bei.batch.worker import Columns, Worker
from bei.kinds import Task
from bei.text.tokenizer import TextInput


class Scorer(Worker):
    tasks = (Task.RERANK,)
    command = "bei rerank"
    options: RerankOptions

    def score(self, queries: list[str], texts: list[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """float32 [len(texts)]: each text scored against its query."""
        if not texts:
            return np.zeros((0,), np.float32)
        pairs: list[TextInput] = list(zip(queries, texts, strict=True))
        logits = self.engine_rows(pairs, None, progress)
        return activate(logits, self.options.raw_scores)[:, 0].astype(np.float32)

    def run(self, rows: Rows, progress: Callable[[int], None] | None = None) -> Columns:
        queries = rows.queries if self.options.query is None else [self.options.query] * len(rows.texts)
        assert queries is not None  # read_part reads the queries of a job without --query
        return {"score": self.score(queries, rows.texts, progress)}
