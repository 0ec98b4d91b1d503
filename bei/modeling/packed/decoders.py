"""Causal decoders (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3 text) as one packed module.

One implementation, `CausalDecoder`, parameterized by a `Flavor`: what each family's transformers
code does differently (projection biases, Qwen3's per-head q/k RMSNorm, Gemma2's scaled embeddings,
(1 + weight) RMSNorm, sandwich norms, query_pre_attn_scalar and attention logit soft-capping, which
layers attend through a sliding window; Gemma3's (1 + w) q / k norms, rotary bases per layer type and,
with `use_bidirectional_attention` (EmbeddingGemma), attention both ways). The checkpoint's
config.json is read as transformers 5.23 reads it, with the family's defaults for keys it leaves out.

The state dict keeps transformers' spelling of the base model (`embed_tokens`, `layers.N.self_attn.o_proj`,
`norm`, plus the `score` head), except that the Linears reading the same input are fused, one GEMM each
(and one FP8 quantize of their input): `self_attn.qkv_proj` (q, k, v stacked) and `mlp.gate_up_proj`.
Converting a checkpoint drops the "model." prefix, `lm_head` and stale rotary buffers, and stacks those.

Outputs, packed, as transformers' model for the task:
- embed: the last hidden state after the final norm [tokens, hidden]
- rerank / classify: `XForSequenceClassification` logits [rows, labels]: the score head at each row's
  last token whose id is not pad_token_id (transformers' rule, so a pad id inside a row is skipped too;
  a row made only of pad ids scores its first token). Gemma2's final_logit_softcapping belongs to its
  causal LM head and is not applied to sequence classification, as in transformers.
- ner: `XForTokenClassification` logits [tokens, labels]

Positions are 0.. within each row: rotary embeddings are relative, so a left-padded reference (whose
positions start after the padding) agrees up to float error. A sliding window of W (transformers:
key index > query index - W) is flash attention's window (W - 1, 0); bidirectional (Gemma3 with
use_bidirectional_attention: transformers takes W // 2 + 1 as the exclusive distance) it is (W // 2, W // 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.packed.attention import FULL, varlen_attention
from bei.modeling.packed.int8 import project
from bei.modeling.packed.layout import Packed
from bei.modeling.packed.weights import fuse_linears, strip_prefixes

Activation = Callable[[torch.Tensor], torch.Tensor]

# transformers' ACT2FN names of the activations these families use
ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}

ROPE_TYPES = ("default", "linear", "llama3")
SLIDING = "sliding_attention"


# --- what differs between families -----------------------------------------------------------
def _no_window_layers(config: Mapping[str, Any], layers: int) -> list[int | None]:
    return [None] * layers


def _every_layer_window(config: Mapping[str, Any], layers: int) -> list[int | None]:
    """Mistral: `sliding_window` (when set) on every layer."""
    return [config.get("sliding_window")] * layers


def _typed_layer_windows(config: Mapping[str, Any], default_types: list[str]) -> list[int | None]:
    types = config.get("layer_types") or default_types
    window = config.get("sliding_window")
    return [window if kind == SLIDING else None for kind in types]


def _qwen_window_layers(config: Mapping[str, Any], layers: int) -> list[int | None]:
    """Qwen2 / Qwen3: with use_sliding_window, the layers from max_window_layers on (or layer_types)."""
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    first = int(config.get("max_window_layers", 28))
    defaults = [SLIDING if window is not None and i >= first else "full_attention" for i in range(layers)]
    return _typed_layer_windows({**config, "sliding_window": window}, defaults)


def _patterned_window_layers(config: Mapping[str, Any], layers: int) -> list[int | None]:
    """Gemma3: layer_types, by default every `sliding_window_pattern`-th layer (6th) full, the others sliding."""
    pattern = int(config.get("sliding_window_pattern") or 6)
    defaults = [SLIDING if (i + 1) % pattern else "full_attention" for i in range(layers)]
    return _typed_layer_windows(config, defaults)


def _alternating_window_layers(config: Mapping[str, Any], layers: int) -> list[int | None]:
    """Gemma2: layer_types, by default sliding on the even layers (0, 2, ...)."""
    defaults = [SLIDING if i % 2 == 0 else "full_attention" for i in range(layers)]
    return _typed_layer_windows(config, defaults)


@dataclass(frozen=True)
class Flavor:
    """How one family's transformers code departs from Llama's."""

    defaults: Mapping[str, Any] = field(default_factory=dict)  # config keys the family's config class defaults
    qkv_bias: bool | None = None  # None: config "attention_bias"
    o_bias: bool | None = None  # None: config "attention_bias"
    mlp_bias: bool | None = False  # None: config "mlp_bias"
    activation_key: str = "hidden_act"
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before rotary
    gemma: bool = False  # Gemma2: sqrt(hidden) embedding scale, (1 + w) norms, sandwich norms, softcap
    window_layers: Callable[[Mapping[str, Any], int], list[int | None]] = _no_window_layers
    bidirectional: bool = False  # Gemma3: config `use_bidirectional_attention` honoured (EmbeddingGemma)


_COMMON = {"rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}

LLAMA = Flavor(defaults=_COMMON, mlp_bias=None)
MISTRAL = Flavor(defaults={**_COMMON, "sliding_window": 4096}, qkv_bias=False, o_bias=False,
                 window_layers=_every_layer_window)  # fmt: skip
QWEN2 = Flavor(defaults=_COMMON, qkv_bias=True, o_bias=False, window_layers=_qwen_window_layers)
QWEN3 = Flavor(defaults={**_COMMON, "head_dim": 128}, qk_norm=True, window_layers=_qwen_window_layers)
GEMMA2 = Flavor(
    defaults={
        **_COMMON, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "sliding_window": 4096,
        "tie_word_embeddings": True,
    },
    activation_key="hidden_activation",
    gemma=True,
    window_layers=_alternating_window_layers,
)  # fmt: skip
GEMMA3 = Flavor(
    defaults={
        **GEMMA2.defaults, "attn_logit_softcapping": None, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "use_bidirectional_attention": False,
    },
    activation_key="hidden_activation",
    qk_norm=True,
    gemma=True,
    window_layers=_patterned_window_layers,
    bidirectional=True,
)  # fmt: skip


# --- the configuration, resolved ------------------------------------------------------------
def _required(config: Mapping[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ModelError(f"config.json of a {config.get('model_type', 'causal')} model lacks {key!r}")
    return config[key]


def rope_frequencies(config: Mapping[str, Any], head_dim: int) -> torch.Tensor:
    """The rotary inverse frequencies [head_dim / 2] (fp32), from `rope_parameters` or the legacy
    `rope_theta` / `rope_scaling`, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    if any(isinstance(value, Mapping) for value in params.values()):
        raise ModelError(f"rope_scaling per layer type is not supported by the torch target: {params}")
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(params["factor"])
    if kind == "llama3":
        factor, low, high = (float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        context = float(params.get("original_max_position_embeddings") or config.get("max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < context / high) * ~(wavelen > context / low)
        return torch.where(medium, smoothed, scaled)
    raise ModelError(f"rope_scaling type {kind!r} is not supported by the torch target (supported: {', '.join(ROPE_TYPES)})")


def sliding_rope_frequencies(config: Mapping[str, Any], head_dim: int) -> torch.Tensor | None:
    """The sliding layers' own rotary frequencies where the config gives them (Gemma3: `rope_parameters`
    per layer type, or the legacy `rope_local_base_freq`); None: every layer uses `rope_frequencies`."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and isinstance(params.get(SLIDING), Mapping):
        return rope_frequencies({**config, "rope_scaling": None, "rope_parameters": params[SLIDING]}, head_dim)
    if config.get("rope_local_base_freq") is not None:
        return rope_frequencies({"rope_theta": config["rope_local_base_freq"]}, head_dim)
    return None


def global_rope_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """`config` with the full-attention layers' rope parameters where it has them per layer type."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and isinstance(params.get("full_attention"), Mapping):
        return {**config, "rope_scaling": None, "rope_parameters": params["full_attention"]}
    return config


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    activation: Activation
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    scale: float  # attention logits scale
    softcap: float | None  # attention logit soft-capping
    windows: tuple[tuple[int, int], ...]  # per layer, flash attention's (left, right)
    sliding: tuple[bool, ...]  # per layer, whether it is a sliding-window layer
    causal: bool
    pad_token_id: int | None
    token_classification_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def read(cls, raw: Mapping[str, Any], flavor: Flavor) -> DecoderConfig:
        config = {**flavor.defaults, **raw}
        hidden, heads = int(_required(config, "hidden_size")), int(_required(config, "num_attention_heads"))
        layers = int(_required(config, "num_hidden_layers"))
        head_dim = int(config.get("head_dim") or hidden // heads)
        activation = config.get(flavor.activation_key)
        if activation not in ACTIVATIONS:
            known = ", ".join(ACTIVATIONS)
            raise ModelError(f"{flavor.activation_key} {activation!r} is not supported by the torch target; known: {known}")
        causal = not (flavor.bidirectional and config.get("use_bidirectional_attention"))
        if config.get("use_bidirectional_attention") and not flavor.bidirectional:
            raise ModelError(f"use_bidirectional_attention is not supported by the torch target's {config.get('model_type')} module")
        windows = flavor.window_layers(config, layers)
        if len(windows) != layers:
            raise ModelError(f"layer_types names {len(windows)} layers, num_hidden_layers is {layers}")
        attention_bias = bool(config.get("attention_bias"))
        return cls(
            vocab_size=int(_required(config, "vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(_required(config, "intermediate_size")),
            layers=layers,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            eps=float(config["rms_norm_eps"]),
            activation=ACTIVATIONS[activation],
            qkv_bias=attention_bias if flavor.qkv_bias is None else flavor.qkv_bias,
            o_bias=attention_bias if flavor.o_bias is None else flavor.o_bias,
            mlp_bias=bool(config.get("mlp_bias")) if flavor.mlp_bias is None else flavor.mlp_bias,
            scale=float(config["query_pre_attn_scalar"] if flavor.gemma else head_dim) ** -0.5,
            softcap=config.get("attn_logit_softcapping") if flavor.gemma else None,
            windows=tuple(FULL if w is None else (int(w) - 1, 0) if causal else (int(w) // 2, int(w) // 2) for w in windows),
            sliding=tuple(w is not None for w in windows),
            causal=causal,
            pad_token_id=config.get("pad_token_id"),
            token_classification_bias=bool(config.get("token_classification_bias", True)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings")),
        )


# --- layers ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Llama's RMSNorm (w * x_normed, cast first) or Gemma's ((1 + w) * x_normed in fp32, cast last)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)


class Rotary(nn.Module):
    """cos / sin of each packed token's position; the frequencies stay fp32 whatever the module's dtype."""

    inv_freq: torch.Tensor

    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self._values = inv_freq.float().clone()
        self.register_buffer("inv_freq", self._values.clone(), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Rotary:
        super()._apply(fn, recurse)
        self.inv_freq = self._values.to(self.inv_freq.device)  # `.to(bf16)` must not round the frequencies
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [tokens, 1 (heads), head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig, window: tuple[int, int], qk_norm: bool, unit_offset: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        self.window, self.scale, self.softcap = window, c.scale, c.softcap
        self.causal = c.causal  # EuroBERT's bidirectional encoder (bei/modeling/packed/eurobert.py) turns it off
        self.split = [c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]  # q, k, v
        self.qkv_proj = nn.Linear(c.hidden_size, sum(self.split), bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        self.q_norm = RMSNorm(c.head_dim, c.eps, unit_offset) if qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.eps, unit_offset) if qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], packed: Packed) -> torch.Tensor:
        q, k, v = project(self.qkv_proj, x, packed).split(self.split, dim=-1)
        q = q.unflatten(-1, (self.heads, self.head_dim))
        k, v = k.unflatten(-1, (self.kv_heads, self.head_dim)), v.unflatten(-1, (self.kv_heads, self.head_dim))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = varlen_attention(q, k, v, packed, causal=self.causal, window=self.window, scale=self.scale, softcap=self.softcap)
        return project(self.o_proj, out.reshape(-1, self.heads * self.head_dim), packed)


class MLP(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)  # gate, then up
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.activation = c.activation

    def forward(self, x: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        gate, up = project(self.gate_up_proj, x, packed).chunk(2, dim=-1)
        return project(self.down_proj, self.activation(gate) * up, packed)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP; Gemma2 also normalizes each block's output ("sandwich")."""

    def __init__(self, c: DecoderConfig, window: tuple[int, int], flavor: Flavor) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.eps, flavor.gemma)
        self.self_attn = Attention(c, window, flavor.qk_norm, flavor.gemma)
        # Llama: the norm before the MLP; Gemma2: the norm of the attention output
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.eps, flavor.gemma)
        self.mlp = MLP(c)
        self.sandwich = flavor.gemma
        if flavor.gemma:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.eps, True)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.eps, True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], packed: Packed) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), rope, packed)
        if not self.sandwich:
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x), packed)
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), packed))


def last_non_pad_token(packed: Packed, pad_token_id: int | None) -> torch.Tensor:
    """[rows]: the packed index of each row's last token whose id is not `pad_token_id` (its first
    token if there is none; its last token when the model has no pad_token_id)."""
    if pad_token_id is None:
        return packed.ends
    index = torch.arange(packed.tokens, device=packed.device)
    candidates = torch.where(packed.input_ids != pad_token_id, index, packed.starts[packed.seq_index])
    out = torch.zeros_like(packed.starts)
    return out.scatter_reduce(0, packed.seq_index, candidates, reduce="amax", include_self=False)


# --- the model ------------------------------------------------------------------------------
class CausalDecoder(nn.Module):
    """Embeddings -> decoder layers -> final norm (-> score head), packed. Subclasses name the flavor."""

    flavor: ClassVar[Flavor] = LLAMA

    def __init__(self, config: dict[str, Any], task: Task, num_labels: int) -> None:
        super().__init__()
        if task not in (Task.EMBED, Task.RERANK, Task.CLASSIFY, Task.NER):
            raise ModelError(f"the torch target's {config.get('model_type')} module has no {task.value} head")
        c = DecoderConfig.read(config, self.flavor)
        self.config, self.task = c, task
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        # Gemma2: sqrt(hidden) in the weights' dtype (cast with the module, as transformers rounds it)
        scale = torch.tensor(c.hidden_size**0.5) if self.flavor.gemma else None
        self.embed_scale: torch.Tensor | None
        self.register_buffer("embed_scale", scale, persistent=False)
        self.layers = nn.ModuleList(DecoderLayer(c, window, self.flavor) for window in c.windows)
        self.norm = RMSNorm(c.hidden_size, c.eps, self.flavor.gemma)
        merged = {**self.flavor.defaults, **config}
        self.rotary = Rotary(rope_frequencies(global_rope_config(merged), c.head_dim))
        local = sliding_rope_frequencies(merged, c.head_dim) if any(c.sliding) else None
        self.local_rotary = Rotary(local) if local is not None else None
        bias = task is Task.NER and c.token_classification_bias
        self.score = nn.Linear(c.hidden_size, num_labels, bias=bias) if task is not Task.EMBED else None

    def forward(self, packed: Packed) -> torch.Tensor:
        x = self.embed_tokens(packed.input_ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale.to(x.dtype)
        rope = self.rotary(packed.positions, x.dtype)
        local = rope if self.local_rotary is None else self.local_rotary(packed.positions, x.dtype)
        for layer, sliding in zip(self.layers, self.config.sliding, strict=True):
            x = layer(x, local if sliding else rope, packed)
        x = self.norm(x)
        if self.score is None:
            return x
        if self.task is Task.NER:
            return self.score(x)
        return self.score(x[last_non_pad_token(packed, self.config.pad_token_id)])

    def convert_hf_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' keys (XModel, XForCausalLM, XFor{Sequence,Token}Classification) -> this module's."""
        out: dict[str, torch.Tensor] = {}
        for key, value in strip_prefixes(state, ("model.",)).items():
            if key.startswith("lm_head.") or key.endswith("rotary_emb.inv_freq"):
                continue
            if key.startswith("score.") and self.score is None:
                continue
            out[key] = value
        if "embed_tokens.weight" not in out and "lm_head.weight" in state and self.config.tie_word_embeddings:
            out["embed_tokens.weight"] = state["lm_head.weight"]
        fuse_linears(out, (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj."), ".self_attn.qkv_proj.")
        fuse_linears(out, (".mlp.gate_proj.", ".mlp.up_proj."), ".mlp.gate_up_proj.")
        return out


class LlamaDecoder(CausalDecoder):
    flavor = LLAMA


class MistralDecoder(CausalDecoder):
    flavor = MISTRAL


class Qwen2Decoder(CausalDecoder):
    flavor = QWEN2


class Qwen3Decoder(CausalDecoder):
    flavor = QWEN3


class Gemma2Decoder(CausalDecoder):
    flavor = GEMMA2


class Gemma3TextDecoder(CausalDecoder):
    flavor = GEMMA3


DECODERS: dict[str, type[CausalDecoder]] = {
    "llama": LlamaDecoder,
    "mistral": MistralDecoder,
    "qwen2": Qwen2Decoder,
    "qwen3": Qwen3Decoder,
    "gemma2": Gemma2Decoder,
    "gemma3_text": Gemma3TextDecoder,
}
