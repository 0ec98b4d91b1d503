"""SPLADE engines: /embed_sparse answers the non-zero weights of each input, by vocabulary index."""

from __future__ import annotations

from typing import Any

import numpy as np

from bei.api.http import Timing
from bei.api.schemas import SparseRequest
from bei.api.scoring import check_count
from bei.inference import InferenceService


async def embed_sparse(service: InferenceService, request: SparseRequest, timing: Timing) -> Any:
    texts = [request.inputs] if isinstance(request.inputs, str) else list(request.inputs)
    check_count(len(texts), service)
    outcome = await service.run(texts, truncate=bool(request.truncate), direction=request.truncation_direction)
    timing.record(outcome)
    answers = []
    for row in outcome.rows:
        nonzero = np.flatnonzero(row)
        answers.append([{"index": int(i), "value": float(row[i])} for i in nonzero])
    return answers
