"""GTE (transformers' native `gte`: alibaba-nlp-community/gte-multilingual-base), packed: NomicBERT's
post-norm rotary layer with biases on q / k / v / o, a GLU MLP whose fused `up_gate_proj` has no
bias (up first, then gate: down(up(x) * act(gate(x))), with a bias on `down_proj`), optional token
types, and BERT's heads (tanh pooler -> classifier; classifier per token).

The weights are read under the names transformers saves and the authors' checkpoints use
(`encoder.layer.N.attention.qkv_proj`, `attention.o_proj`, `attn_ln`, `mlp.up_gate_proj`,
`mlp.down_proj`, `mlp_ln`; heads under `gte.` or `new.`). The authors' own `model_type: new`
checkpoints are read as native ones (bei/modeling/remote_code.py), their NTK scaling as the `linear`
rope type that NomicBertEncoder's rotary applies.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from bei.modeling.packed.blocks import MLP, Activation, Rules, renames
from bei.modeling.packed.nomic import NomicBertEncoder

_GTE = renames(
    {"embeddings.word_embeddings": "embed.tokens", "embeddings.token_type_embeddings": "embed.types", "embeddings.LayerNorm": "embed.norm"},
    "encoder.layer",
    {
        "attention.qkv_proj": "attn.qkv",
        "attention.o_proj": "attn.out",
        "mlp.up_gate_proj": "mlp.up_gate",
        "mlp.down_proj": "mlp.down",
        "attn_ln": "attn_norm",
        "mlp_ln": "mlp_norm",
    },
)


class GteEncoder(NomicBertEncoder):
    """GTE: post-norm, rotary (default or linear rope, from rope_parameters), biased attention, GLU MLP."""

    NAME = "GTE"
    DEFAULTS: ClassVar[dict[str, Any]] = {"hidden_act": "gelu", "type_vocab_size": 1, "rope_theta": 160_000.0}  # GteConfig's
    PREFIXES = ("gte.", "new.", "model.")
    RULES: ClassVar[Rules] = _GTE
    FUSIONS = NomicBertEncoder.FUSIONS[:1]
    BIAS = True

    def mlp(self, hidden: int, inner: int, act: Activation) -> MLP:
        mlp = MLP(hidden, inner, act, bias=True, gated=True)
        mlp.up = nn.Linear(hidden, 2 * inner, bias=False)  # up_gate_proj has no bias, down_proj has one
        return mlp

    def adapt_state(self, state: dict[str, torch.Tensor]) -> None:
        """`up_gate_proj` holds [up; gate]; bei's gated MLP applies the activation to its first half: [gate; up]."""
        for key in [k for k in state if ".mlp.up_gate." in k]:
            up, gate = state.pop(key).chunk(2, dim=0)
            state[key.replace(".mlp.up_gate.", ".mlp.up.")] = torch.cat((gate, up), dim=0)
