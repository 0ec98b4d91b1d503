"""Jina embeddings v3 (transformers' native `jina_embeddings_v3`: jinaai/jina-embeddings-v3), packed:
XLM-RoBERTa's post-norm layer with rotary positions instead of learned ones (rotate-half, theta
20000 by default), biases on q / k / v / o and on the plain fc1 -> act -> fc2 MLP, token type
embeddings, and XLM-RoBERTa's heads (dense -> tanh -> out_proj on <s>; a classifier per token).

The weights are read under the names transformers saves and the public checkpoint uses
(`emb_ln`, `encoder.layers.N.mixer.Wqkv`, `mixer.out_proj`, `mlp.fc1` / `fc2`, `norm1` / `norm2`,
heads' base model under `roberta.`) and under transformers' native ones. The public checkpoint's task
LoRA adapters are merged into these weights before they get here (bei/modeling/lora.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

from bei.modeling.packed.blocks import Rules, per_task, renames
from bei.modeling.packed.nomic import NATIVE_LAYER, NomicBertEncoder

_PUBLIC = renames(
    {"embeddings.word_embeddings": "embed.tokens", "embeddings.token_type_embeddings": "embed.types", "emb_ln": "embed.norm"},
    "encoder.layers",
    {
        "mixer.Wqkv": "attn.qkv",
        "mixer.out_proj": "attn.out",
        "mlp.fc1": "mlp.up",
        "mlp.fc2": "mlp.down",
        "norm1": "attn_norm",
        "norm2": "mlp_norm",
    },
)
_NATIVE = renames({"embeddings.LayerNorm": "embed.norm"}, "layers", {**NATIVE_LAYER, "mlp.fc1": "mlp.up", "mlp.fc2": "mlp.down"})


class JinaEmbeddingsV3Encoder(NomicBertEncoder):
    """Jina v3: post-norm, rotary, biased attention and MLP, XLM-RoBERTa's heads."""

    NAME = "Jina embeddings v3"
    DEFAULTS: ClassVar[dict[str, Any]] = {"hidden_act": "gelu", "type_vocab_size": 1, "rope_theta": 20_000.0}  # JinaEmbeddingsV3Config's
    PREFIXES = ("roberta.", "model.")
    RULES: ClassVar[Rules] = _PUBLIC + _NATIVE
    HEADS = per_task({"classifier.dense": "head.transform.dense", "classifier.out_proj": "head.out"}, {"classifier": "head.out"}, {})
    FUSIONS = NomicBertEncoder.FUSIONS[:1]
    BIAS, GATED = True, False
