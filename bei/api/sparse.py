"""/embed_sparse: the non-zero weights of each input, by vocabulary index (TEI's `[{index, value}]`), of
SPLADE engines (their pooled vocabulary row) and of bge-m3 engines (their lexical weights, bei/api/m3.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bei.api.http import Timing
from bei.api.m3 import lexical_weights
from bei.api.schemas import SparseRequest
from bei.api.scoring import check_count
from bei.inference import InferenceService
from bei.kinds import Task


async def embed_sparse(service: InferenceService, request: SparseRequest, timing: Timing) -> Any:
    texts = [request.inputs] if isinstance(request.inputs, str) else list(request.inputs)
    check_count(len(texts), service)
    outcome = await service.run(texts, truncate=bool(request.truncate), direction=request.truncation_direction)
    timing.record(outcome)
    m3 = service.engine.manifest.task is Task.EMBED_M3
    answers = []
    for encoded, row in zip(outcome.encoded, outcome.rows, strict=True):
        weights = lexical_weights(service, encoded, row) if m3 else [(int(i), float(row[i])) for i in np.flatnonzero(row)]
        answers.append([{"index": index, "value": value} for index, value in weights])
    return answers
