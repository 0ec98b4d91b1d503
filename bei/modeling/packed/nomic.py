"""NomicBERT (nomic-embed-text-v1 / v1.5), packed: BERT's post-norm layer with rotary positions
(rotate-half, theta `rotary_emb_base`), a SwiGLU MLP (fc2(fc11(x) * silu(fc12(x)))) and no biases
in attention or MLP; token type embeddings, no absolute positions.

Built from the config in transformers' native spelling (bei/modeling/remote_code.py rewrites the
public `n_embd` / `n_layer` / ... spelling); reads the weights under the public checkpoints' names
(`emb_ln`, `encoder.layers.N.attn.Wqkv`, `mlp.fc11` / `fc12` / `fc2`, `norm1` / `norm2`) and
under transformers' native ones. The heads are transformers' native NomicBertFor* (BERT's).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.packed.blocks import (
    MLP,
    Activation,
    Attention,
    Embeddings,
    EncoderLayer,
    Rotary,
    Rules,
    Transform,
    activation,
    per_task,
    renames,
    required,
)
from bei.modeling.packed.encoders import Encoder
from bei.modeling.packed.layout import Packed

_PUBLIC = renames(
    {"embeddings.word_embeddings": "embed.tokens", "embeddings.token_type_embeddings": "embed.types", "emb_ln": "embed.norm"},
    "encoder.layers",
    {
        "attn.Wqkv": "attn.qkv",
        "attn.out_proj": "attn.out",
        "mlp.fc11": "mlp.value",
        "mlp.fc12": "mlp.gate",
        "mlp.fc2": "mlp.down",
        "norm1": "attn_norm",
        "norm2": "mlp_norm",
    },
)
# transformers' native names of a post-norm rotary layer's attention and norms (NomicBERT's, Jina v3's)
NATIVE_LAYER = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.out",
    "post_attention_layernorm": "attn_norm",
    "post_mlp_layernorm": "mlp_norm",
}
_NATIVE = renames(
    {"embeddings.LayerNorm": "embed.norm"},
    "layers",
    {**NATIVE_LAYER, "mlp.up_proj": "mlp.value", "mlp.gate_proj": "mlp.gate", "mlp.down_proj": "mlp.down"},
)


class NomicBertEncoder(Encoder):
    """NomicBERT: post-norm, rotary, SwiGLU, no biases but the LayerNorms'."""

    PREFIXES: ClassVar[tuple[str, ...]] = ("nomic_bert.", "bert.", "model.")
    RULES: ClassVar[Rules] = _PUBLIC + _NATIVE
    HEADS = per_task({"pooler.dense": "head.transform.dense", "classifier": "head.out"}, {"classifier": "head.out"}, {})
    # the MLP's gate (fc12, silu applied) and value (fc11) become one projection, gate first
    FUSIONS = (*Encoder.FUSIONS, ((".mlp.gate.", ".mlp.value."), ".mlp.up."))

    NAME: ClassVar[str] = "NomicBERT"
    DEFAULTS: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "type_vocab_size": 2, "rope_theta": 1000.0}  # NomicBertConfig's

    def __init__(self, config: dict[str, Any], task: Task, num_labels: int) -> None:
        super().__init__(config, task, num_labels)
        if task is Task.SPARSE:
            raise ModelError(f"the torch target has no {self.NAME} masked-LM (sparse) head; it serves embed, rerank, classify and ner")
        hidden, eps = int(required(config, "hidden_size")), float(config.get("layer_norm_eps", 1e-12))
        heads, inner = int(required(config, "num_attention_heads")), int(required(config, "intermediate_size"))
        act = activation(config, "hidden_act", self.DEFAULTS["hidden_act"])
        types = int(config.get("type_vocab_size", self.DEFAULTS["type_vocab_size"]) or 0)
        self.embed = Embeddings(int(required(config, "vocab_size")), hidden, eps, types=types)
        self.layers = nn.ModuleList(
            EncoderLayer(
                self.attention(hidden, heads),
                self.mlp(hidden, inner, act),
                nn.LayerNorm(hidden, eps=eps),
                nn.LayerNorm(hidden, eps=eps),
                pre_norm=False,
                rope="global",
            )  # fmt: skip
            for _ in range(int(required(config, "num_hidden_layers")))
        )
        params = config.get("rope_parameters") or {}
        if params.get("rope_type", "default") not in ("default", "linear"):
            raise ModelError(f"config.json rope_parameters.rope_type={params['rope_type']!r} is not supported; only 'default' and 'linear'")
        self.theta = float(params.get("rope_theta", self.DEFAULTS["rope_theta"]))
        # `linear` (transformers' rope type; GTE's fixed NTK scaling, bei/modeling/remote_code.py): every frequency / factor
        self.rope_factor = float(params.get("factor", 1.0)) if params.get("rope_type") == "linear" else 1.0
        self.head_dim = int(config.get("head_dim") or hidden // heads)
        if self.head_dim * heads != hidden:
            raise ModelError("config.json head_dim x num_attention_heads must equal hidden_size for the torch target")
        self.make_head(hidden, per_task(Transform(hidden, torch.tanh), None, None))

    BIAS: ClassVar[bool] = False  # on the attention's and the MLP's Linear layers
    GATED: ClassVar[bool] = True  # a gated MLP (SwiGLU) or fc1 -> act -> fc2

    def attention(self, hidden: int, heads: int) -> Attention:
        return Attention(hidden, heads, bias=self.BIAS)

    def mlp(self, hidden: int, inner: int, act: Activation) -> MLP:
        return MLP(hidden, inner, act, bias=self.BIAS, gated=self.GATED)

    def positions(self, packed: Packed) -> None:
        return None

    def rotary(self, packed: Packed) -> Rotary:
        """(cos, sin) of the rotate-half layout, in fp32."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=packed.device) / self.head_dim
        freqs = packed.positions.float().unsqueeze(-1) * (1.0 / self.theta**exponents / self.rope_factor)
        angles = torch.cat((freqs, freqs), dim=-1)
        return {"global": (angles.cos(), angles.sin())}
