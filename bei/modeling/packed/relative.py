"""Encoders whose attention adds relative position scores, packed: MPNet and DeBERTa-v2 / v3.

Both are BERT's post-norm layer with one change inside attention: a score that depends on the
distance between query and key is added before the softmax. MPNet adds a learned bias per head and
distance bucket (T5's buckets, shared by every layer); DeBERTa-v2's disentangled attention adds
content->position and position->content scores, the query and key projected against a table of
relative position embeddings. Flash attention cannot add such a score, so these layers attend over
the padded layout of the packed stream (`Packed.unpack`) with a float mask: the bias, and -inf at
padded keys. Relative positions are counted within each row, as transformers counts them within
a right-padded row.

DeBERTa-v2's optional convolution (`conv_kernel_size` > 0, as in deberta-v2-xlarge) runs over each
row's embeddings on its own: `TokenConvolution` unpacks the stream to the padded layout, whose
padding is zeros as transformers' masked embeddings are, so no row sees another's tokens.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.packed.blocks import (
    MLP,
    Activation,
    Embeddings,
    Rules,
    Transform,
    activation,
    per_task,
    renames,
    required,
)
from bei.modeling.packed.encoders import Encoder, fairseq_positions
from bei.modeling.packed.int8 import project
from bei.modeling.packed.layout import Packed

Relative = tuple[torch.Tensor, ...]  # what every layer's attention is given to make its relative position term


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packed, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """q / k / v [tokens, heads, dim], bias [heads | rows x heads, max_len, max_len] added to the
    scaled scores -> [tokens, heads, dim]; padded keys are masked out."""
    qp, kp, vp = (packed.unpack(t).transpose(1, 2) for t in (q, k, v))  # [rows, heads, len, dim]
    keys = packed.key_padding_mask()[:, None, None, :]
    mask = bias.to(qp.dtype).expand(qp.shape[0], -1, -1, -1).masked_fill(~keys, float("-inf"))
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)
    return packed.pack(out.transpose(1, 2))


class RelativeAttention(nn.Module):
    """Fused q / k / v -> scores + a relative position term -> output projection (MPNet: the shared bias)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ModelError(f"hidden size {hidden} is not a multiple of the {heads} attention heads")
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def scores(self, q: torch.Tensor, k: torch.Tensor, packed: Packed, relative: Relative) -> tuple[torch.Tensor, float]:
        """The term added to the scores and the scale of q . k."""
        return relative[0], self.head_dim**-0.5

    def forward(self, x: torch.Tensor, packed: Packed, relative: Relative) -> torch.Tensor:
        q, k, v = project(self.qkv, x, packed).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        term, scale = self.scores(q, k, packed, relative)
        return project(self.out, biased_attention(q, k, v, packed, term, scale).reshape(x.shape[0], -1), packed)


class RelativeLayer(nn.Module):
    """BERT's post-norm layer around a `RelativeAttention`."""

    def __init__(self, attention: RelativeAttention, hidden: int, inner: int, act: Activation, eps: float) -> None:
        super().__init__()
        self.attn = attention
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = MLP(hidden, inner, act, bias=True, gated=False)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, packed: Packed, relative: Relative) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, packed, relative))
        return self.mlp_norm(x + self.mlp(x, packed))


_LAYER_NAMES = {
    "intermediate.dense": "mlp.up",
    "output.dense": "mlp.down",
    "output.LayerNorm": "mlp_norm",
}


class MPNetEncoder(Encoder):
    """MPNet: RoBERTa's embeddings (no token types), BERT's layers plus a learned bias per head and
    relative position bucket, computed once and added in every layer; RoBERTa's classifier head."""

    PREFIXES = ("mpnet.",)
    RULES: ClassVar[Rules] = renames(
        {
            "embeddings.word_embeddings": "embed.tokens",
            "embeddings.position_embeddings": "embed.positions",
            "embeddings.LayerNorm": "embed.norm",
            "encoder.relative_attention_bias": "relative_bias",
        },
        "encoder.layer",
        {
            "attention.attn.q": "attn.q",
            "attention.attn.k": "attn.k",
            "attention.attn.v": "attn.v",
            "attention.attn.o": "attn.out",
            "attention.LayerNorm": "attn_norm",
            **_LAYER_NAMES,
        },
    )
    HEADS = per_task({"classifier.dense": "head.transform.dense", "classifier.out_proj": "head.out"}, {"classifier": "head.out"}, {})
    BUCKETS = 32  # transformers' MPNetEncoder.compute_position_bias buckets into 32 whatever the config says
    MAX_DISTANCE = 128

    def __init__(self, config: dict[str, Any], task: Task, num_labels: int) -> None:
        super().__init__(config, task, num_labels)
        if task is Task.SPARSE:
            raise ModelError("the torch target has no MPNet masked-LM (sparse) head; MPNet serves embed, rerank, classify and ner")
        self.padding_idx = 1  # transformers' MPNetEmbeddings counts positions from 1 + 1 whatever pad_token_id says
        hidden, eps = int(required(config, "hidden_size")), float(config.get("layer_norm_eps", 1e-12))
        act = activation(config, "hidden_act", "gelu")
        heads, inner = int(required(config, "num_attention_heads")), int(required(config, "intermediate_size"))
        positions = int(required(config, "max_position_embeddings"))
        self.embed = Embeddings(int(required(config, "vocab_size")), hidden, eps, positions=positions)
        n_layers = int(required(config, "num_hidden_layers"))
        self.layers = nn.ModuleList(RelativeLayer(RelativeAttention(hidden, heads), hidden, inner, act, eps) for _ in range(n_layers))
        self.relative_bias = nn.Embedding(int(config.get("relative_attention_num_buckets", 32)), heads)
        self.make_head(hidden, per_task(Transform(hidden, torch.tanh), None, None))

    def positions(self, packed: Packed) -> torch.Tensor:
        return fairseq_positions(packed, self.padding_idx)

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """T5's bidirectional buckets of key - query distances (MPNetEncoder.relative_position_bucket)."""
        half = self.BUCKETS // 2
        n = -relative
        out = (n < 0).to(torch.long) * half
        n = n.abs()
        exact = half // 2
        large = exact + (torch.log(n.float() / exact) / math.log(self.MAX_DISTANCE / exact) * (half - exact)).to(torch.long)
        return out + torch.where(n < exact, n, large.clamp(max=half - 1))

    def forward(self, packed: Packed) -> torch.Tensor:
        x = self.embed(packed, self.positions(packed))
        pos = torch.arange(packed.max_len, device=packed.device)
        bias = self.relative_bias(self.bucket(pos[None, :] - pos[:, None])).permute(2, 0, 1)  # [heads, len, len]
        for layer in self.layers:
            x = layer(x, packed, (bias,))
        return x if self.head is None else self.head(x, packed)


class DisentangledAttention(RelativeAttention):
    """DeBERTa-v2's attention: q . k plus content->position (q . key projection of the relative
    embedding at the query-key distance) and position->content (k . query projection of it), all
    divided by sqrt(head_dim x the number of terms). With `share_att_key` the positions go through
    the content projections, else through their own `pos_key` / `pos_query`. Without
    `relative_attention` there are no position terms, but pos_att_type still sets the scale."""

    def __init__(self, hidden: int, heads: int, kinds: tuple[str, ...], relative: bool, shared: bool, span: int) -> None:
        super().__init__(hidden, heads)
        self.scale = (self.head_dim * (1 + len(kinds))) ** -0.5
        self.kinds, self.shared, self.span = (kinds if relative else ()), shared, span
        self.pos_key = nn.Linear(hidden, hidden) if "c2p" in self.kinds and not shared else None
        self.pos_query = nn.Linear(hidden, hidden) if "p2c" in self.kinds and not shared else None

    def _project(self, table: torch.Tensor, which: int, own: nn.Module | None) -> torch.Tensor:
        """The relative embeddings [2 span, hidden] through query (0) or key (1) projection -> [heads, 2 span, dim].

        Shared keys go through the fused q / k / v module itself (the table is small), not a slice of
        its weight: an FP8 / bf16 build replaces that module and its weight with its own."""
        if own is not None:
            out = own(table)
        else:
            width = self.heads * self.head_dim
            out = self.qkv(table)[:, which * width : (which + 1) * width]
        return out.reshape(table.shape[0], self.heads, self.head_dim).transpose(0, 1)

    def scores(self, q: torch.Tensor, k: torch.Tensor, packed: Packed, relative: Relative) -> tuple[torch.Tensor, float]:
        table, distance = relative  # [2 span, hidden] (normed), [len, len] bucketed query - key
        table = table[: 2 * self.span]
        index = torch.clamp(distance + self.span, 0, 2 * self.span - 1)
        term = torch.zeros((), dtype=q.dtype, device=q.device)
        rows, length = packed.rows, packed.max_len
        if "c2p" in self.kinds:
            c2p = packed.unpack(q).transpose(1, 2) @ self._project(table, 1, self.pos_key).transpose(-1, -2)  # [rows, heads, len, 2 span]
            term = term + torch.gather(c2p, -1, index.expand(rows, self.heads, length, length))
        if "p2c" in self.kinds:
            p2c = packed.unpack(k).transpose(1, 2) @ self._project(table, 0, self.pos_query).transpose(-1, -2)
            reverse = torch.clamp(-distance + self.span, 0, 2 * self.span - 1)
            term = term + torch.gather(p2c, -1, reverse.expand(rows, self.heads, length, length)).transpose(-1, -2)
        if term.dim() == 0:
            term = term.expand(1, self.heads, length, length)
        return term * self.scale, self.scale


class DebertaEmbeddings(nn.Module):
    """Token (+ absolute position, + token type) embeddings at `embedding_size`, projected (no bias) to the hidden size, then LayerNorm."""

    def __init__(self, config: dict[str, Any], hidden: int, eps: float) -> None:
        super().__init__()
        width = int(config.get("embedding_size") or hidden)
        types = int(config.get("type_vocab_size", 0))
        self.tokens = nn.Embedding(int(required(config, "vocab_size")), width)
        biased = bool(config.get("position_biased_input", True))
        self.positions = nn.Embedding(int(required(config, "max_position_embeddings")), width) if biased else None
        self.types = nn.Embedding(types, width) if types > 0 else None
        self.project = nn.Linear(width, hidden, bias=False) if width != hidden else nn.Identity()
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, packed: Packed) -> torch.Tensor:
        x = self.tokens(packed.input_ids)
        if self.positions is not None:
            x = x + self.positions(packed.positions)
        if self.types is not None:
            types = packed.token_type_ids if packed.token_type_ids is not None else torch.zeros_like(packed.input_ids)
            x = x + self.types(types)
        return self.norm(self.project(x))


class TokenConvolution(nn.Module):
    """DeBERTa-v2's ConvLayer after the first layer: a 1-D convolution over each row's embeddings
    (zero padded at both ends of the row, as transformers' masked embeddings and the conv's own
    padding give), the activation, added to the first layer's output, then LayerNorm."""

    def __init__(self, config: dict[str, Any], hidden: int, eps: float) -> None:
        super().__init__()
        kernel, groups = int(config["conv_kernel_size"]), int(config.get("conv_groups") or 1)
        if kernel % 2 == 0:  # transformers' padding (kernel - 1) // 2 keeps the length only for odd kernels
            raise ModelError(f"config.json conv_kernel_size={kernel}: DeBERTa-v2's convolution needs an odd kernel size")
        if hidden % groups:
            raise ModelError(f"config.json conv_groups={groups} does not divide hidden_size {hidden}")
        self.conv = nn.Conv1d(hidden, hidden, kernel, padding=(kernel - 1) // 2, groups=groups)
        self.act = activation(config, "conv_act", "tanh")
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, embedded: torch.Tensor, layer_out: torch.Tensor, packed: Packed) -> torch.Tensor:
        rows = packed.unpack(embedded).transpose(1, 2)  # [rows, hidden, max_len], zeros past each row's end
        out = packed.pack(self.conv(rows).transpose(1, 2))
        return self.norm(layer_out + self.act(out))


def log_buckets(relative: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """DeBERTa's log buckets of query - key distances: exact within buckets // 2, logarithmic beyond (make_log_bucket_position)."""
    sign = torch.sign(relative)
    mid = buckets // 2
    magnitude = torch.where((relative < mid) & (relative > -mid), torch.tensor(mid - 1).type_as(relative), relative.abs())
    log_pos = torch.ceil(torch.log(magnitude / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(magnitude <= mid, relative.type_as(log_pos), log_pos * sign).to(torch.long)


class DebertaV2Encoder(Encoder):
    """DeBERTa-v2 / v3: disentangled attention over log-bucketed relative positions (a table shared
    by every layer, LayerNorm-ed where `norm_rel_ebd` says so), BERT's post-norm layers; its
    sequence head is ContextPooler (dense -> pooler_hidden_act on [CLS]) -> classifier. With
    `conv_kernel_size` the first layer's output gets a convolution of the embeddings added (`TokenConvolution`)."""

    PREFIXES = ("deberta.",)
    RULES: ClassVar[Rules] = renames(
        {
            "embeddings.word_embeddings": "embed.tokens",
            "embeddings.position_embeddings": "embed.positions",
            "embeddings.token_type_embeddings": "embed.types",
            "embeddings.embed_proj": "embed.project",
            "embeddings.LayerNorm": "embed.norm",
            "encoder.rel_embeddings": "relative_table",
            "encoder.LayerNorm": "relative_norm",
            "encoder.conv.conv": "conv.conv",
            "encoder.conv.LayerNorm": "conv.norm",
        },
        "encoder.layer",
        {
            "attention.self.query_proj": "attn.q",
            "attention.self.key_proj": "attn.k",
            "attention.self.value_proj": "attn.v",
            "attention.self.pos_key_proj": "attn.pos_key",
            "attention.self.pos_query_proj": "attn.pos_query",
            "attention.output.dense": "attn.out",
            "attention.output.LayerNorm": "attn_norm",
            **_LAYER_NAMES,
        },
    )
    HEADS = per_task({"pooler.dense": "head.transform.dense", "classifier": "head.out"}, {"classifier": "head.out"}, {})

    def __init__(self, config: dict[str, Any], task: Task, num_labels: int) -> None:
        super().__init__(config, task, num_labels)
        if task is Task.SPARSE:
            raise ModelError("the torch target has no DeBERTa-v2 masked-LM (sparse) head; it serves embed, rerank, classify and ner")
        hidden, eps = int(required(config, "hidden_size")), float(config.get("layer_norm_eps", 1e-7))
        heads, inner = int(required(config, "num_attention_heads")), int(required(config, "intermediate_size"))
        if int(config.get("attention_head_size") or hidden // heads) * heads != hidden:
            raise ModelError("config.json attention_head_size x num_attention_heads must equal hidden_size for the torch target")
        if int(config.get("pooler_hidden_size") or hidden) != hidden:
            raise ModelError("config.json pooler_hidden_size must equal hidden_size for the torch target")
        act = activation(config, "hidden_act", "gelu")
        kinds = config.get("pos_att_type") or []
        if isinstance(kinds, str):
            kinds = [kind.strip() for kind in kinds.lower().split("|")]
        if set(kinds) - {"c2p", "p2c"}:
            raise ModelError(f"config.json pos_att_type={kinds!r}: only c2p and p2c are supported")
        self.relative = bool(config.get("relative_attention", False))
        max_relative = int(config.get("max_relative_positions", -1))
        self.max_relative = max_relative if max_relative >= 1 else int(required(config, "max_position_embeddings"))
        self.buckets = int(config.get("position_buckets", -1))
        span = self.buckets if self.buckets > 0 else self.max_relative
        self.embed = DebertaEmbeddings(config, hidden, eps)  # type: ignore[assignment]
        shared = bool(config.get("share_att_key", False))
        self.layers = nn.ModuleList(
            RelativeLayer(DisentangledAttention(hidden, heads, tuple(kinds), self.relative, shared, span), hidden, inner, act, eps)
            for _ in range(int(required(config, "num_hidden_layers")))
        )
        self.relative_table = nn.Embedding(2 * span, hidden) if self.relative else None
        norms = [name.strip() for name in str(config.get("norm_rel_ebd", "none")).lower().split("|")]
        self.relative_norm = nn.LayerNorm(hidden, eps=eps) if "layer_norm" in norms else None
        self.conv = TokenConvolution(config, hidden, eps) if int(config.get("conv_kernel_size") or 0) > 0 else None
        pooler = Transform(hidden, activation(config, "pooler_hidden_act", "gelu"))
        self.make_head(hidden, per_task(pooler, None, None))

    def forward(self, packed: Packed) -> torch.Tensor:
        x = self.embed(packed)
        pos = torch.arange(packed.max_len, device=packed.device)
        distance = pos[:, None] - pos[None, :]
        if self.buckets > 0:
            distance = log_buckets(distance, self.buckets, self.max_relative)
        if self.relative_table is not None:
            table = self.relative_table.weight
            table = self.relative_norm(table) if self.relative_norm is not None else table
        else:
            table = x.new_zeros(0)
        embedded = x
        for i, layer in enumerate(self.layers):
            x = layer(x, packed, (table, distance))
            if i == 0 and self.conv is not None:
                x = self.conv(embedded, x, packed)
        return x if self.head is None else self.head(x, packed)


RELATIVE_ENCODERS: dict[str, type[Encoder]] = {
    "mpnet": MPNetEncoder,
    "deberta-v2": DebertaV2Encoder,
}
