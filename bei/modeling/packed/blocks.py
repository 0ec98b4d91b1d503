"""The layers every packed encoder is made of: embeddings, fused-q/k/v attention over the packed
stream, MLPs (plain or gated), post- and pre-norm encoder layers, the task heads, and the renaming
rules that map a transformers checkpoint's keys onto them (bei/modeling/packed/encoders.py
assembles the families from these)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.packed.attention import FULL, varlen_attention
from bei.modeling.packed.bf16 import Bf16Linear
from bei.modeling.packed.cpu_attention import packed_attention_bf16, supports
from bei.modeling.packed.int8 import project
from bei.modeling.packed.layout import Packed
from bei.modeling.packed.pooling import pool_packed
from bei.modeling.pooling import PoolingConfig, PoolingMode

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
    """Fused q / k / v projection -> (rotary) -> variable-length attention -> output projection.
    With `bf16_kernel` (CPU engines whose GEMMs take bf16, `use_cpu_attention`), full attention runs
    on bei's CPU kernel over the packed q / k / v in bf16 (bei/modeling/packed/cpu_attention.py)."""

    bf16_kernel: bool = False

    def __init__(self, hidden: int, heads: int, bias: bool) -> None:
        super().__init__()
        if hidden % heads:
            raise ModelError(f"hidden size {hidden} is not a multiple of the {heads} attention heads")
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.out = nn.Linear(hidden, hidden, bias=bias)

    def forward(
        self, x: torch.Tensor, packed: Packed, window: tuple[int, int], rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        qkv = project(self.qkv, x, packed).view(x.shape[0], 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        if rotary is not None:
            q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        if self.bf16_kernel and window == FULL:
            packed_qkv = (qkv if rotary is None else torch.stack((q, k, v), dim=1)).reshape(x.shape[0], -1)
            out = packed_attention_bf16(packed_qkv.to(torch.bfloat16), packed.cu_seqlens, self.heads, self.head_dim**-0.5)
        else:
            out = varlen_attention(q, k, v, packed, window=window)
        return project(self.out, out.reshape(x.shape[0], -1), packed)


# activations oneDNN applies in a GEMM's epilogue (bei/modeling/packed/onednn.py): the function -> its name there
FUSABLE_ACTIVATIONS: dict[Activation, str] = {F.gelu: "gelu", _tanh_gelu: "gelu_tanh", F.relu: "relu"}


def fuse_mlp_activations(module: nn.Module) -> int:
    """Hand each plain (not gated) MLP's activation to its bf16 up projection, which applies it before
    rounding its output; returns how many MLPs."""
    count = 0
    for mlp in module.modules():
        if isinstance(mlp, MLP) and not mlp.gated and isinstance(mlp.up, Bf16Linear) and mlp.act in FUSABLE_ACTIVATIONS:
            mlp.up.fuse(mlp.act, FUSABLE_ACTIVATIONS[mlp.act])
            mlp.fused = True
            count += 1
    return count


def use_cpu_kernels(module: nn.Module) -> tuple[int, int]:
    """A CPU engine whose GEMMs take bf16 (precision bf16, W8A8): attention on bei's kernel where it runs
    (`use_cpu_attention`), MLP activations in the up projection's GEMM (`fuse_mlp_activations`).
    Returns how many layers of each."""
    return use_cpu_attention(module), fuse_mlp_activations(module)


def use_cpu_attention(module: nn.Module) -> int:
    """Run `module`'s full attention layers on bei's bf16 CPU kernel where it runs here (`supports`);
    returns how many layers do. For CPU engines whose GEMMs take bf16 inputs (bf16, W8A8)."""
    layers = [m for m in module.modules() if isinstance(m, Attention) and supports(m.head_dim)]
    for layer in layers:
        layer.bf16_kernel = True
    return len(layers)


class MLP(nn.Module):
    """up -> act -> down; gated (GeGLU): `up` makes [input, gate] and the output is act(input) * gate."""

    act: Activation
    gated: bool
    up: nn.Module
    fused = False  # the up projection applies `act` in its GEMM (`fuse_mlp_activations`)

    def __init__(self, hidden: int, inner: int, act: Activation, bias: bool, gated: bool) -> None:
        super().__init__()
        self.act, self.gated = act, gated
        self.up = nn.Linear(hidden, inner * (2 if gated else 1), bias=bias)
        self.down = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        h = project(self.up, x, packed)
        if self.gated:
            h, gate = h.chunk(2, dim=-1)
            h = self.act(h) * gate
        elif not self.fused:
            h = self.act(h)
        return project(self.down, h, packed)


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
            return x + self.mlp(self.mlp_norm(x), packed)
        x = self.attn_norm(x + self.attn(x, packed, self.window, rope))
        return self.mlp_norm(x + self.mlp(x, packed))


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


def rename_key(key: str, rules: Rules) -> str:
    for pattern, replacement in rules:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


# the oldest BERT checkpoints name LayerNorm parameters gamma / beta
COMMON_RULES: Rules = ((r"\.gamma$", ".weight"), (r"\.beta$", ".bias"))


def per_task(sequence: T, token: T, mlm: T) -> dict[Task, T]:
    """What the sequence classification (rerank, classify), token classification (ner) and MLM (sparse) heads get."""
    return {Task.RERANK: sequence, Task.CLASSIFY: sequence, Task.NER: token, Task.SPARSE: mlm}


# the word / position / token type embeddings, as BERT, RoBERTa and DistilBERT name them
