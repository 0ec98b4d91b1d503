"""The inputs every build exports and verifies with, and the reference outputs they are checked against."""

from __future__ import annotations

import numpy as np
import torch

from bei.backend import Batch
from bei.kinds import Task
from bei.modeling.module import EngineModule, input_names
from bei.modeling.spec import ModelSpec
from bei.text.tokenizer import Encoded, TokenizerRuntime

# sample inputs of unequal length: exported and verified with padding in every batch
SAMPLE_TEXTS = (
    "Hello world.",
    "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon.",
    "A",
    "Engines are compiled once and served many times; verification compares them with the reference.",
)
SAMPLE_PAIRS = tuple(zip(SAMPLE_TEXTS, reversed(SAMPLE_TEXTS), strict=True))


def sample_batch(spec: ModelSpec, tokenizer: TokenizerRuntime) -> Batch:
    items: list[str | tuple[str, str]] = list(SAMPLE_PAIRS if spec.task in (Task.RERANK, Task.CLASSIFY) else SAMPLE_TEXTS)
    encoded: list[Encoded] = []
    for i, item in enumerate(items):
        prompt = "query: " if (spec.pooling and not spec.pooling.include_prompt and i % 2 == 0) else None
        encoded.append(tokenizer.encode(item, truncate=True, prompt=prompt))
    return Batch.pad(encoded, tokenizer.pad_id, spec.padding_side)


def reference_outputs(module: EngineModule, batch: Batch) -> np.ndarray:
    feeds = {k: torch.from_numpy(v) for k, v in batch.feeds(input_names(module.spec)).items()}
    with torch.no_grad():
        return module(**feeds).float().numpy()
