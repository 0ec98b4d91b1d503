"""Bidirectional encoders, packed: BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ModernBERT.

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

import re
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from bei.errors import ModelError
from bei.modeling.packed.attention import FULL, varlen_attention
from bei.modeling.packed.layout import Packed
from bei.modeling.packed.pooling import pool_packed
from bei.modeling.packed.weights import fuse_linears, strip_prefixes
from bei.modeling.pooling import PoolingConfig, PoolingMode
from bei.kinds import Task

T = TypeVar("T")
Activation = Callable[[torch.Tensor], torch.Tensor]
Rotary = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type -> (cos, sin) [tokens, head_dim]


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# transformers' ACT2FN names -> the same function (gelu_new / gelu_fast are the tanh approximation)
ACTIVATIONS: dict[str, Activation] = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": _tanh_gelu,
    "gelu_fast": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(config: dict[str, Any], field: str, default: str | None = None) -> Activation:
    """The activation config.json names in `field`; ModelError for one bei does not implement."""
    name = config.get(field, default)
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ModelError(f"config.json {field}={name!r} is not supported by the torch target; one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def required(config: dict[str, Any], field: str) -> Any:
    if config.get(field) is None:
        raise ModelError(f"config.json has no {field!r}")
    return config[field]


# --- building blocks ----------------------------------------------------------------------------
class Embeddings(nn.Module):
    """Token (+ learned position, + token type) embeddings, then LayerNorm."""

    def __init__(self, vocab: int, hidden: int, eps: float, positions: int = 0, types: int = 0, norm_bias: bool = True) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(positions, hidden) if positions else None
        self.types = nn.Embedding(types, hidden) if types else None
        self.norm = nn.LayerNorm(hidden, eps=eps, bias=norm_bias)

    def forward(self, packed: Packed, positions: torch.Tensor | None) -> torch.Tensor:
        x = self.tokens(packed.input_ids)
        if self.types is not None:
            types = packed.token_type_ids if packed.token_type_ids is not None else torch.zeros_like(packed.input_ids)
            x = x + self.types(types)
        if self.positions is not None and positions is not None:
            x = x + self.positions(positions)
        return self.norm(x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half layout) of [tokens, heads, dim], computed in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(1)).to(x.dtype)


class Attention(nn.Module):
    """Fused q / k / v projection -> (rotary) -> variable-length attention -> output projection."""

    def __init__(self, hidden: int, heads: int, bias: bool) -> None:
        super().__init__()
        if hidden % heads:
            raise ModelError(f"hidden size {hidden} is not a multiple of the {heads} attention heads")
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.out = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor, packed: Packed, window: tuple[int, int], rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        if rotary is not None:
            q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        return self.out(varlen_attention(q, k, v, packed, window=window).reshape(x.shape[0], -1))


class MLP(nn.Module):
    """up -> act -> down; gated (GeGLU): `up` makes [input, gate] and the output is act(input) * gate."""

    def __init__(self, hidden: int, inner: int, act: Activation, bias: bool, gated: bool) -> None:
        super().__init__()
        self.act, self.gated = act, gated
        self.up = nn.Linear(hidden, inner * (2 if gated else 1), bias=bias)
        self.down = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            h, gate = h.chunk(2, dim=-1)
            return self.down(self.act(h) * gate)
        return self.down(self.act(h))


class EncoderLayer(nn.Module):
    """Post-norm (BERT: norm(x + f(x))) or pre-norm (ModernBERT: x + f(norm(x))) attention + MLP."""

    def __init__(
        self,
        attention: Attention,
        mlp: MLP,
        attn_norm: nn.Module,
        mlp_norm: nn.Module,
        pre_norm: bool,
        window: tuple[int, int] = FULL,
        rope: str | None = None,
    ) -> None:
        super().__init__()
        self.attn, self.mlp, self.attn_norm, self.mlp_norm = attention, mlp, attn_norm, mlp_norm
        self.pre_norm, self.window, self.rope = pre_norm, window, rope

    def forward(self, x: torch.Tensor, packed: Packed, rotary: Rotary | None) -> torch.Tensor:
        rope = rotary[self.rope] if rotary is not None and self.rope is not None else None
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), packed, self.window, rope)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, packed, self.window, rope))
        return self.mlp_norm(x + self.mlp(x))


class Transform(nn.Module):
    """dense -> act (-> LayerNorm): BERT's pooler and MLM transform, RoBERTa's heads, ModernBERT's head."""

    def __init__(self, hidden: int, act: Activation, bias: bool = True, eps: float | None = None, norm_bias: bool = True) -> None:
        super().__init__()
        self.act = act
        self.dense = nn.Linear(hidden, hidden, bias=bias)
        self.norm = nn.LayerNorm(hidden, eps=eps, bias=norm_bias) if eps is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


_MEAN = PoolingConfig(modes=(PoolingMode.MEAN,))


class TaskHead(nn.Module):
    """(row pooling: first token or mean ->) (transform ->) out: logits per row or per token."""

    def __init__(self, transform: Transform | None, out: nn.Linear, pooling: str | None) -> None:
        super().__init__()
        self.transform, self.out, self.pooling = transform, out, pooling

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        if self.pooling == "cls":
            x = x[packed.starts]
        elif self.pooling == "mean":
            x = pool_packed(_MEAN, x, packed)
        if self.transform is not None:
            x = self.transform(x)
        return self.out(x)


# --- the encoder ----------------------------------------------------------------------------------
Rules = tuple[tuple[str, str], ...]  # (pattern, replacement): the first that matches a key renames it


def renames(names: dict[str, str], layers: str = "", per_layer: dict[str, str] | None = None) -> Rules:
    """Rules from checkpoint names to the module's (a name matches a key up to a dot, or all of it);
    `per_layer` names follow `layers` + ".N." in the checkpoint and "layers.N." in the module."""
    rules = [(rf"^{re.escape(old)}(?=\.|$)", new) for old, new in names.items()]
    rules += [(rf"^{re.escape(layers)}\.(\d+)\.{re.escape(old)}(?=\.|$)", rf"layers.\1.{new}") for old, new in (per_layer or {}).items()]
    return tuple(rules)


def _rename(key: str, rules: Rules) -> str:
    for pattern, replacement in rules:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


# the oldest BERT checkpoints name LayerNorm parameters gamma / beta
_COMMON_RULES: Rules = ((r"\.gamma$", ".weight"), (r"\.beta$", ".bias"))
def per_task(sequence: T, token: T, mlm: T) -> dict[Task, T]:
    """What the sequence classification (rerank, classify), token classification (ner) and MLM (sparse) heads get."""
    return {Task.RERANK: sequence, Task.CLASSIFY: sequence, Task.NER: token, Task.SPARSE: mlm}


# the word / position / token type embeddings, as BERT, RoBERTa and DistilBERT name them
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
            renamed[_rename(_rename(key, _COMMON_RULES), rules)] = value
        fuse_linears(renamed, (".attn.q.", ".attn.k.", ".attn.v."), ".attn.qkv.")
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
        """fairseq's positions: padding_idx + 1 + the count of non-pad tokens so far in the row (pads: padding_idx)."""
        real = (packed.input_ids != self.padding_idx).to(torch.int64)
        count = torch.cumsum(real, dim=0)
        before_row = (count[packed.starts] - real[packed.starts])[packed.seq_index]
        return (count - before_row) * real + self.padding_idx


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
        self.embed = Embeddings(int(required(config, "vocab_size")), hidden, eps, positions=int(required(config, "max_position_embeddings")))
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
    HEADS = per_task(*({"head.dense": "head.transform.dense", "head.norm": "head.transform.norm", out: "head.out"} for out in ("classifier", "classifier", "decoder")))
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
                Attention(hidden, heads, bias), MLP(hidden, inner, act, mlp_bias, gated=True),
                nn.LayerNorm(hidden, eps=eps, bias=norm_bias) if i else nn.Identity(),
                nn.LayerNorm(hidden, eps=eps, bias=norm_bias), pre_norm=True,
                window=(half, half) if kind == "local" else FULL, rope=kind,
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
    "modernbert": ModernBertEncoder,
}

