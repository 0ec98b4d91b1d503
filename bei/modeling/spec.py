"""What a checkpoint is, as one typed object: task, architecture, pooling, heads, limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bei.kinds import Task
from bei.modeling.m3 import M3Columns
from bei.modeling.pooling import PoolingConfig


@dataclass(frozen=True)
class DenseLayer:
    """A sentence-transformers `Dense` module: Linear(in, out, bias) then an activation."""

    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # "tanh", "identity", "relu", "gelu", "sigmoid"


@dataclass(frozen=True)
class ModelSpec:
    """Everything the export and the runtime need to know about a checkpoint."""

    path: Path
    architecture: str  # config.json architectures[0], e.g. "BertModel"
    model_type: str  # config.json model_type, e.g. "bert"
    base_model: str  # "encoder_bert" | "encoder"
    task: Task
    hidden_size: int
    num_heads: int
    max_seq_len: int
    pooling: PoolingConfig | None = None
    normalize: bool = False
    dense: tuple[DenseLayer, ...] = ()
    labels: tuple[str, ...] = ()
    uses_token_type_ids: bool = False
    padding_side: str = "right"
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # causal rerankers / classifiers whose checkpoint defines one: inputs are rendered through it (as ST does)
    chat_template: str | None = None
    # bge-m3 (task embed_m3): the width of its ColBERT vectors (bei/modeling/m3.py)
    colbert_dim: int = 0
    # the task LoRA adapter merged into the weights at build (jina-embeddings-v3: bei/modeling/lora.py)
    adapter: str | None = None

    @property
    def embedding_dim(self) -> int | None:
        if self.task is Task.EMBED_M3:
            return self.hidden_size  # the CLS row of the last hidden state
        if self.task is not Task.EMBED:
            return None
        if self.dense:
            return self.dense[-1].out_features
        n_modes = len(self.pooling.modes) if self.pooling else 1
        return self.hidden_size * n_modes

    @property
    def m3_columns(self) -> M3Columns:
        return M3Columns(self.hidden_size, self.colbert_dim)
