"""The options of a batch job's engine calls, apart from the modules that load engines (cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CHUNK = 8192  # rows per part file: the memory of a part is its texts and vectors (8192 x 1024 floats: 32 MiB)


@dataclass(frozen=True)
class EngineOptions:
    """What every job's engine takes: `bei embed` and `bei rerank` alike."""

    truncate: bool = True  # inputs over the model's limit are truncated (False: the job fails on one)
    engine_threads: int | None = None
    tokenization_workers: int = 1


@dataclass(frozen=True)
class EmbedOptions(EngineOptions):
    """`bei embed --engine`: vectors as POST /v1/embeddings answers them."""

    normalize: bool | None = None  # None: as the model does (sentence-transformers' Normalize module)
    prompt_name: str | None = None  # None: the model's default prompt, if any
    dimensions: int | None = None  # Matryoshka truncation
    sparse: bool = False  # a bge-m3 (embed_m3) engine's lexical weights too, as a `sparse` column


@dataclass(frozen=True)
class RerankOptions(EngineOptions):
    """`bei rerank --engine`: each row's text scored against one query (`query`), or against its own query (a
    field / column of the input, when `query` is None), as POST /rerank scores them."""

    query: str | None = None
    raw_scores: bool = False  # the logits, without the sigmoid


RUNTIME_ONLY = ("engine_threads", "tokenization_workers")  # change how fast a job runs, never what it writes
