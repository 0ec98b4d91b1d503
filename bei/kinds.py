"""The vocabulary every layer shares: what an engine computes (`Task`) and in what number format
(`Precision`). A leaf: it imports nothing of bei, so the manifest, the modeling code, the targets and
the routes can all name the same values."""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    EMBED = "embed"  # dense embeddings: /v1/embeddings, /embed
    RERANK = "rerank"  # sequence classification with one label: /rerank, /v1/rerank, /predict
    CLASSIFY = "classify"  # sequence classification with id2label: /predict
    NER = "ner"  # token classification: /predict_tokens
    SPARSE = "sparse"  # SPLADE: /embed_sparse
    # bge-m3: dense (/v1/embeddings, /embed), sparse lexical weights (/embed_sparse) and ColBERT
    # vectors (/embed_all), from one forward
    EMBED_M3 = "embed_m3"


# the graph output each task's engine computes (its name in the ONNX graph / TensorRT plan)
GRAPH_OUTPUTS: dict[Task, str] = {
    Task.EMBED: "sentence_embedding",
    Task.RERANK: "logits",
    Task.CLASSIFY: "logits",
    Task.NER: "logits",
    Task.SPARSE: "sparse_embedding",
    Task.EMBED_M3: "token_embeddings",
}
# tasks whose graph output is per token [batch, seq, ...]: the runtime hands each input its real tokens' rows
PER_TOKEN_TASKS: frozenset[Task] = frozenset({Task.NER, Task.EMBED_M3})
# tasks that answer dense embeddings (/v1/embeddings, /embed, Cohere's embed)
DENSE_TASKS: frozenset[Task] = frozenset({Task.EMBED, Task.EMBED_M3})


class Precision(StrEnum):
    """The number format of an engine's weights and GEMMs."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    NVFP4 = "nvfp4"
    NVFP4_MLP = "nvfp4-mlp"
    INT8 = "int8"

    @property
    def bytes_per_weight(self) -> float:
        return _BYTES_PER_WEIGHT[self]


_BYTES_PER_WEIGHT = {
    Precision.FP32: 4.0, Precision.FP16: 2.0, Precision.BF16: 2.0, Precision.FP8: 1.0,
    Precision.NVFP4: 0.5625, Precision.NVFP4_MLP: 1.0, Precision.INT8: 1.0,
}  # fmt: skip
