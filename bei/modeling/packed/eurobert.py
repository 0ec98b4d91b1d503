"""EuroBERT (EuroBERT-210m / 610m / 2.1B), packed: Llama's pre-norm layers (RMSNorm, rotary,
SwiGLU, no biases) attending both ways, and the final norm; bei/modeling/packed/decoders.py's
layers with causal attention turned off.

Heads, as transformers' native EuroBertFor* (and the checkpoints' own code) compute them:
- rerank / classify: dense -> GELU -> classifier, pooled by `classifier_pooling` (public configs
  spell it `clf_pooling`; bei/modeling/remote_code.py rewrites it): "bos" (the first token), "mean"
  (the mean of each row's tokens) or "late" (the head on every token, then the mean of the logits);
- ner: classifier on every token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.packed.decoders import LLAMA, CausalDecoder, DecoderLayer, Flavor
from bei.modeling.packed.layout import Packed
from bei.modeling.packed.pooling import pool_packed
from bei.modeling.pooling import PoolingConfig, PoolingMode

EUROBERT = Flavor(defaults={**LLAMA.defaults, "rms_norm_eps": 1e-5, "pad_token_id": 128001}, mlp_bias=None)
_MEAN = PoolingConfig(modes=(PoolingMode.MEAN,))


class EuroBertEncoder(CausalDecoder):
    """Llama's layers, bidirectional; EuroBERT's heads."""

    flavor = EUROBERT

    def __init__(self, config: dict[str, Any], task: Task, num_labels: int) -> None:
        super().__init__(config, task, num_labels)
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.causal = False
        hidden = self.config.hidden_size
        self.pooling = str(config.get("classifier_pooling", "late"))
        if self.pooling not in ("bos", "mean", "late"):
            raise ModelError(f"config.json classifier_pooling={self.pooling!r} is not supported; 'bos', 'mean' or 'late'")
        self.score = None
        sequence = task in (Task.RERANK, Task.CLASSIFY)
        self.dense = nn.Linear(hidden, hidden) if sequence else None
        self.classifier = nn.Linear(hidden, num_labels) if task is not Task.EMBED else None

    def forward(self, packed: Packed) -> torch.Tensor:
        x = self.embed_tokens(packed.input_ids)
        rope = self.rotary(packed.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, packed)
        x = self.norm(x)
        if self.classifier is None:
            return x
        if self.dense is None:  # ner
            return self.classifier(x)
        if self.pooling == "late":
            return pool_packed(_MEAN, self.classifier(F.gelu(self.dense(x))), packed)
        pooled = x[packed.starts] if self.pooling == "bos" else pool_packed(_MEAN, x, packed)
        return self.classifier(F.gelu(self.dense(pooled)))

    def convert_hf_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base model's keys as Llama's; the heads' `dense` and `classifier` kept as they are."""
        heads = {k: v for k, v in state.items() if k.startswith(("dense.", "classifier."))}
        body = {k: v for k, v in state.items() if k not in heads}
        out = super().convert_hf_state(body) | heads
        own = self.state_dict().keys()
        return {key: value for key, value in out.items() if key in own}
