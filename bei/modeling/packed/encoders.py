"""Bidirectional encoders, packed: BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA, ModernBERT
(MPNet and DeBERTa-v2, whose attention adds relative position scores, are in relative.py).

One layer class serves every family: BERT, RoBERTa, XLM-R and DistilBERT are the same post-norm
layer (only their checkpoint names differ), ModernBERT is the pre-norm variant with a gated (GeGLU)
MLP, rotary positions and alternating global / local (sliding window) attention. Query, key and
value are one fused projection. Every per-token op runs on the packed stream; attention goes
through `varlen_attention`. The task heads reproduce transformers' `XForSequenceClassification`
(BERT's tanh pooler, RoBERTa's head on <s>, DistilBERT's pre_classifier + ReLU, ModernBERT's
head with cls / mean pooling), `XForTokenClassification` and `XForMaskedLM` (tied decoder).

`convert_hf_state` renames a transformers checkpoint's keys (any Auto class's prefix) to the
module's, fuses q / k / v, ties the decoder and drops what the task does not use (a pooler under an
embedder, an MLM head under a classifier, buffers).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.packed.attention import FULL
from bei.modeling.packed.blocks import (
    COMMON_RULES,
    MLP,
    Activation,
    Attention,
    Embeddings,
    EncoderLayer,
    Rotary,
    Rules,
    TaskHead,
    Transform,
    activation,
    per_task,
    rename_key,
    renames,
    required,
)
from bei.modeling.packed.layout import Packed
from bei.modeling.packed.weights import fuse_linears, strip_prefixes

_LEARNED_EMBEDDINGS = {
    "embeddings.word_embeddings": "embed.tokens",
    "embeddings.position_embeddings": "embed.positions",
    "embeddings.token_type_embeddings": "embed.types",
    "embeddings.LayerNorm": "embed.norm",
}


class Encoder(nn.Module):
    """Embeddings -> layers -> final norm (-> task head); a family sets the config reading and names."""

    PREFIXES: ClassVar[tuple[str, ...]] = ()
    RULES: ClassVar[Rules] = ()  # the base model's names
    # per task, the checkpoint names of its head; other heads' weights in the checkpoint are dropped
    # (BertForPreTraining holds both the pooler and the MLM transform, RoBERTa classifiers a stale pooler)
    HEADS: ClassVar[dict[Task, dict[str, str]]] = {}
    # (parts, fused): Linear layers of the checkpoint that become one of the module (q / k / v -> qkv)
    FUSIONS: ClassVar[tuple[tuple[tuple[str, ...], str], ...]] = (((".attn.q.", ".attn.k.", ".attn.v."), ".attn.qkv."),)

    embed: Embeddings
    layers: nn.ModuleList
    final_norm: nn.Module
    head: TaskHead | None

    def __init__(self, config: dict[str, Any], task: Task, num_labels: int) -> None:
        super().__init__()
        self.config, self.task, self.num_labels = config, task, num_labels
        self.final_norm = nn.Identity()

    def make_head(self, hidden: int, transforms: dict[Task, Transform | None], cls_pooling: str = "cls") -> None:
        """The task's head: classifier on the pooled row (rerank / classify), per token (ner), MLM decoder (sparse)."""
        if self.task is Task.EMBED:
            self.head = None
            return
        transform = transforms[self.task]
        if self.task is Task.SPARSE:
            out = nn.Linear(hidden, int(required(self.config, "vocab_size")), bias=self.decoder_bias())
            if self.config.get("tie_word_embeddings", True):
                out.weight = self.embed.tokens.weight
            self.head = TaskHead(transform, out, None)
            return
        if self.num_labels < 1:
            raise ModelError(f"a {self.task.value} head needs labels (config.json id2label / num_labels)")
        pooling = None if self.task is Task.NER else cls_pooling
        self.head = TaskHead(transform, nn.Linear(hidden, self.num_labels), pooling)

    def decoder_bias(self) -> bool:
        return True

    def adapt_state(self, state: dict[str, torch.Tensor]) -> None:
        """Rearrange renamed (and fused) checkpoint tensors in place where a family lays them out otherwise."""

    def positions(self, packed: Packed) -> torch.Tensor | None:
        return packed.positions

    def rotary(self, packed: Packed) -> Rotary | None:
        return None

    def forward(self, packed: Packed) -> torch.Tensor:
        x = self.embed(packed, self.positions(packed))
        rotary = self.rotary(packed)
        for layer in self.layers:
            x = layer(x, packed, rotary)
        x = self.final_norm(x)
        return x if self.head is None else self.head(x, packed)

    def convert_hf_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        renamed: dict[str, torch.Tensor] = {}
        rules = self.RULES + renames(self.HEADS.get(self.task, {}))
        for key, value in strip_prefixes(state, self.PREFIXES).items():
            renamed[rename_key(rename_key(key, COMMON_RULES), rules)] = value
        for parts, fused in self.FUSIONS:
            fuse_linears(renamed, parts, fused)
        self.adapt_state(renamed)
        if self.task is Task.SPARSE and self.config.get("tie_word_embeddings", True) and "embed.tokens.weight" in renamed:
            renamed["head.out.weight"] = renamed["embed.tokens.weight"]
        own = self.state_dict().keys()
        return {key: value for key, value in renamed.items() if key in own}


class BertEncoder(Encoder):
    """BERT: learned absolute positions and token types, post-norm layers; the tanh pooler under its classifier."""

    PREFIXES = ("bert.", "roberta.", "model.")
    RULES: ClassVar[Rules] = renames(
        _LEARNED_EMBEDDINGS,
        "encoder.layer",
        {
            "attention.self.query": "attn.q",
            "attention.self.key": "attn.k",
            "attention.self.value": "attn.v",
            "attention.output.dense": "attn.out",
            "attention.output.LayerNorm": "attn_norm",
            "intermediate.dense": "mlp.up",
            "output.dense": "mlp.down",
            "output.LayerNorm": "mlp_norm",
        },
    )
    HEADS = per_task(
        {"pooler.dense": "head.transform.dense", "classifier": "head.out"},
        {"classifier": "head.out"},
        {
            "cls.predictions.transform.dense": "head.transform.dense",
            "cls.predictions.transform.LayerNorm": "head.transform.norm",
            "cls.predictions.decoder.weight": "head.out.weight",
            "cls.predictions.bias": "head.out.bias",  # decoder.bias is its tied copy
        },
    )

    def __init__(self, config: dict[str, Any], task: Task, num_labels: int) -> None:
        super().__init__(config, task, num_labels)
        kind = config.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ModelError(f"config.json position_embedding_type={kind!r} is not supported by the torch target; only 'absolute'")
        hidden, eps = int(required(config, "hidden_size")), float(config.get("layer_norm_eps", 1e-12))
        act = activation(config, "hidden_act", "gelu")
        self.embed = Embeddings(
            int(required(config, "vocab_size")), hidden, eps,
            positions=int(required(config, "max_position_embeddings")), types=int(config.get("type_vocab_size", 2)),
        )  # fmt: skip
        heads, inner = int(required(config, "num_attention_heads")), int(required(config, "intermediate_size"))
        self.layers = nn.ModuleList(
            post_norm_layer(hidden, heads, inner, act, eps) for _ in range(int(required(config, "num_hidden_layers")))
        )
        self.make_head(hidden, self.head_transforms(hidden, act, eps))

    def head_transforms(self, hidden: int, act: Activation, eps: float) -> dict[Task, Transform | None]:
        return per_task(Transform(hidden, torch.tanh), None, Transform(hidden, act, eps=eps))


def post_norm_layer(hidden: int, heads: int, inner: int, act: Activation, eps: float) -> EncoderLayer:
    """The BERT / RoBERTa / DistilBERT layer: biases everywhere, LayerNorm after each residual."""
    return EncoderLayer(
        Attention(hidden, heads, bias=True), MLP(hidden, inner, act, bias=True, gated=False),
        nn.LayerNorm(hidden, eps=eps), nn.LayerNorm(hidden, eps=eps), pre_norm=False,
    )  # fmt: skip


class RobertaEncoder(BertEncoder):
    """RoBERTa / XLM-RoBERTa: BERT with positions counted from padding_idx + 1 and their own heads."""

    HEADS = per_task(
        {"classifier.dense": "head.transform.dense", "classifier.out_proj": "head.out"},
        {"classifier": "head.out"},
        {
            "lm_head.dense": "head.transform.dense",
            "lm_head.layer_norm": "head.transform.norm",
            "lm_head.decoder.weight": "head.out.weight",
            "lm_head.bias": "head.out.bias",  # decoder.bias is its tied copy
        },
    )

    def __init__(self, config: dict[str, Any], task: Task, num_labels: int) -> None:
        self.padding_idx = int(required(config, "pad_token_id"))
        super().__init__(config, task, num_labels)

    def head_transforms(self, hidden: int, act: Activation, eps: float) -> dict[Task, Transform | None]:
        # the classification head is dense -> tanh on <s>; the LM head uses exact GELU whatever hidden_act says
        return per_task(Transform(hidden, torch.tanh), None, Transform(hidden, F.gelu, eps=eps))

    def positions(self, packed: Packed) -> torch.Tensor:
        return fairseq_positions(packed, self.padding_idx)


def fairseq_positions(packed: Packed, padding_idx: int) -> torch.Tensor:
    """fairseq's positions: padding_idx + 1 + the count of non-pad tokens so far in the row (pads: padding_idx)."""
    real = (packed.input_ids != padding_idx).to(torch.int64)
    count = torch.cumsum(real, dim=0)
    before_row = (count[packed.starts] - real[packed.starts])[packed.seq_index]
    return (count - before_row) * real + padding_idx


class ElectraEncoder(Encoder):
    """ELECTRA's discriminator: BERT's layers under embeddings of `embedding_size`, projected to the
    hidden size (`embeddings_project`) where the two differ; no pooler; its sequence classifier is
    dense -> GELU -> out_proj on [CLS]."""

    PREFIXES = ("electra.",)
    RULES: ClassVar[Rules] = renames({"embeddings_project": "project"}) + BertEncoder.RULES
    HEADS = per_task({"classifier.dense": "head.transform.dense", "classifier.out_proj": "head.out"}, {"classifier": "head.out"}, {})

    def __init__(self, config: dict[str, Any], task: Task, num_labels: int) -> None:
        super().__init__(config, task, num_labels)
        if task is Task.SPARSE:
            raise ModelError("the torch target has no ELECTRA masked-LM (sparse) head; ELECTRA serves embed, rerank, classify and ner")
        hidden, eps = int(required(config, "hidden_size")), float(config.get("layer_norm_eps", 1e-12))
        width = int(config.get("embedding_size") or hidden)
        self.embed = Embeddings(
            int(required(config, "vocab_size")), width, eps,
            positions=int(required(config, "max_position_embeddings")), types=int(config.get("type_vocab_size", 2)),
        )  # fmt: skip
        self.project = nn.Linear(width, hidden) if width != hidden else nn.Identity()
        heads, inner = int(required(config, "num_attention_heads")), int(required(config, "intermediate_size"))
        act = activation(config, "hidden_act", "gelu")
        self.layers = nn.ModuleList(
            post_norm_layer(hidden, heads, inner, act, eps) for _ in range(int(required(config, "num_hidden_layers")))
        )
        self.make_head(hidden, per_task(Transform(hidden, F.gelu), None, None))

    def forward(self, packed: Packed) -> torch.Tensor:
        x = self.project(self.embed(packed, packed.positions))
        for layer in self.layers:
            x = layer(x, packed, None)
        return x if self.head is None else self.head(x, packed)


class DistilBertEncoder(Encoder):
    """DistilBERT: BERT's layer under other names, no token types, pre_classifier + ReLU under its classifier."""

    PREFIXES = ("distilbert.",)
    RULES = renames(
        _LEARNED_EMBEDDINGS,
        "transformer.layer",
        {
            "attention.q_lin": "attn.q",
            "attention.k_lin": "attn.k",
            "attention.v_lin": "attn.v",
            "attention.out_lin": "attn.out",
            "sa_layer_norm": "attn_norm",
            "ffn.lin1": "mlp.up",
            "ffn.lin2": "mlp.down",
            "output_layer_norm": "mlp_norm",
        },
    )
    HEADS = per_task(
        {"pre_classifier": "head.transform.dense", "classifier": "head.out"},
        {"classifier": "head.out"},
        {"vocab_transform": "head.transform.dense", "vocab_layer_norm": "head.transform.norm", "vocab_projector": "head.out"},
    )

    def __init__(self, config: dict[str, Any], task: Task, num_labels: int) -> None:
        super().__init__(config, task, num_labels)
        hidden, eps = int(required(config, "dim")), 1e-12  # DistilBERT's LayerNorms are fixed at 1e-12
        act = activation(config, "activation", "gelu")
        self.embed = Embeddings(
            int(required(config, "vocab_size")), hidden, eps, positions=int(required(config, "max_position_embeddings"))
        )
        heads, inner = int(required(config, "n_heads")), int(required(config, "hidden_dim"))
        self.layers = nn.ModuleList(post_norm_layer(hidden, heads, inner, act, eps) for _ in range(int(required(config, "n_layers"))))
        self.make_head(hidden, per_task(Transform(hidden, F.relu), None, Transform(hidden, act, eps=eps)))


class ModernBertEncoder(Encoder):
    """ModernBERT: pre-norm, GeGLU MLP, rotary positions, global attention every n-th layer and a
    sliding window of local_attention // 2 tokens each side in the others; no biases by default."""

    PREFIXES = ("model.",)
    RULES = renames(
        {"embeddings.tok_embeddings": "embed.tokens", "embeddings.norm": "embed.norm"},
        "layers",
        {"attn.Wqkv": "attn.qkv", "attn.Wo": "attn.out", "mlp.Wi": "mlp.up", "mlp.Wo": "mlp.down"},
    )
    HEADS = per_task(
        *(
            {"head.dense": "head.transform.dense", "head.norm": "head.transform.norm", out: "head.out"}
            for out in ("classifier", "classifier", "decoder")
        )
    )
    LAYER_TYPES: ClassVar[dict[str, str]] = {"full_attention": "global", "sliding_attention": "local"}
    DEFAULT_THETA: ClassVar[dict[str, float]] = {"global": 160_000.0, "local": 10_000.0}

    def __init__(self, config: dict[str, Any], task: Task, num_labels: int) -> None:
        super().__init__(config, task, num_labels)
        hidden, heads = int(required(config, "hidden_size")), int(required(config, "num_attention_heads"))
        eps, norm_bias = float(config.get("norm_eps", 1e-5)), bool(config.get("norm_bias", False))
        bias, mlp_bias = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
        act = activation(config, "hidden_activation", "gelu")
        inner, n_layers = int(required(config, "intermediate_size")), int(required(config, "num_hidden_layers"))
        kinds = self._layer_kinds(n_layers)
        half = int(config.get("local_attention", 128)) // 2
        self.embed = Embeddings(int(required(config, "vocab_size")), hidden, eps, norm_bias=norm_bias)
        self.layers = nn.ModuleList(
            EncoderLayer(
                Attention(hidden, heads, bias),
                MLP(hidden, inner, act, mlp_bias, gated=True),
                nn.LayerNorm(hidden, eps=eps, bias=norm_bias) if i else nn.Identity(),
                nn.LayerNorm(hidden, eps=eps, bias=norm_bias),
                pre_norm=True,
                window=(half, half) if kind == "local" else FULL,
                rope=kind,
            )
            for i, kind in enumerate(kinds)
        )
        self.final_norm = nn.LayerNorm(hidden, eps=eps, bias=norm_bias)
        self.head_dim = hidden // heads
        self.theta = {kind: self._theta(kind) for kind in sorted(set(kinds))}
        pooling = config.get("classifier_pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise ModelError(f"config.json classifier_pooling={pooling!r} is not supported; 'cls' or 'mean'")
        head = Transform(
            hidden, activation(config, "classifier_activation", "gelu"), bias=bool(config.get("classifier_bias", False)),
            eps=eps, norm_bias=norm_bias,
        )  # fmt: skip
        self.make_head(hidden, per_task(head, head, head), cls_pooling=pooling)

    def _layer_kinds(self, n_layers: int) -> list[str]:
        names = self.config.get("layer_types")
        if names is None:
            every = int(self.config.get("global_attn_every_n_layers", 3))
            return ["local" if i % every else "global" for i in range(n_layers)]
        if len(names) != n_layers or any(name not in self.LAYER_TYPES for name in names):
            raise ModelError(f"config.json layer_types={names!r}: {n_layers} of {', '.join(self.LAYER_TYPES)} expected")
        return [self.LAYER_TYPES[name] for name in names]

    def _theta(self, kind: str) -> float:
        """rope_parameters[layer type].rope_theta (transformers 5), else global_rope_theta / local_rope_theta."""
        layer_type = {v: k for k, v in self.LAYER_TYPES.items()}[kind]
        params = (self.config.get("rope_parameters") or {}).get(layer_type) or {}
        rope_type = params.get("rope_type", (self.config.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type != "default":
            raise ModelError(f"config.json rope_parameters.{layer_type}.rope_type={rope_type!r} is not supported; only 'default'")
        return float(params.get("rope_theta", self.config.get(f"{kind}_rope_theta", self.DEFAULT_THETA[kind])))

    def decoder_bias(self) -> bool:
        return bool(self.config.get("decoder_bias", True))

    def positions(self, packed: Packed) -> None:
        return None

    def rotary(self, packed: Packed) -> Rotary:
        """(cos, sin) per layer kind, in fp32 whatever the module's dtype (no buffer to be cast to bf16)."""
        out: Rotary = {}
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=packed.device) / self.head_dim
        for kind, theta in self.theta.items():
            freqs = packed.positions.float().unsqueeze(-1) * (1.0 / theta**exponents)
            angles = torch.cat((freqs, freqs), dim=-1)
            out[kind] = (angles.cos(), angles.sin())
        return out


ENCODERS: dict[str, type[Encoder]] = {
    "bert": BertEncoder,
    "roberta": RobertaEncoder,
    "xlm-roberta": RobertaEncoder,
    "distilbert": DistilBertEncoder,
    "electra": ElectraEncoder,
    "modernbert": ModernBertEncoder,
}
