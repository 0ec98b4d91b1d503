"""The options of a batch job's vectors, apart from the modules that load engines (cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CHUNK = 8192  # rows per part file: the memory of a part is its texts and vectors (8192 x 1024 floats: 32 MiB)


@dataclass(frozen=True)
class EmbedOptions:
    normalize: bool | None = None  # None: as the model does (sentence-transformers' Normalize module)
    prompt_name: str | None = None  # None: the model's default prompt, if any
    dimensions: int | None = None  # Matryoshka truncation
    truncate: bool = True  # inputs over the model's limit are truncated (False: the job fails on one)
    engine_threads: int | None = None
    tokenization_workers: int = 1
