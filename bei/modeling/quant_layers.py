"""Which Linear layers a quantization type quantizes: one rule for ModelOpt's config (TensorRT
engines), the dry-run plan and the torch target's FP8 layers.

Patterns are matched (fnmatch, as ModelOpt matches its `quantizer_name` patterns) against
`<layer name>.weight_quantizer`. Heads stay unquantized; `fp4_mlp_only` also leaves attention alone;
NVFP4 needs input widths that are a multiple of its block.
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatch

QUANT_TYPES = ("fp8", "fp4", "fp4_mlp_only")
NVFP4_BLOCK = 16

HEAD_PATTERNS = (
    "dense.*",  # sentence-transformers Dense layers of the engine module
    "*pooler*", "*classifier*", "*score*", "*lm_head*", "*cls.predictions*",
    "*vocab_transform*", "*vocab_projector*", "transformer.head.*", "transformer.decoder.*",
    "body.head.*", "body.decoder.*",
    "transformer.dense.*", "body.dense.*",  # EuroBERT's sequence head: dense -> GELU -> classifier
    "m3.*",  # bge-m3's sparse and ColBERT heads (bei/modeling/m3.py)
)  # fmt: skip
# attention projections (BERT/RoBERTa `attention.*`, DistilBERT `attention.*_lin`, ModernBERT `attn.*`,
# Llama/Qwen/Mistral/Gemma `self_attn.*_proj`): excluded by fp4_mlp_only
ATTENTION_PATTERNS = ("*attention*", "*attn*")


def excluded_patterns(qtype: str) -> list[str]:
    """The quantizer-name patterns `qtype` leaves unquantized (besides NVFP4's too-narrow layers)."""
    return list(HEAD_PATTERNS) + (list(ATTENTION_PATTERNS) if qtype == "fp4_mlp_only" else [])


def is_quantized(name: str, in_features: int, qtype: str) -> bool:
    if qtype not in QUANT_TYPES:
        return False
    if qtype != "fp8" and in_features % NVFP4_BLOCK:
        return False
    quantizer = f"{name}.weight_quantizer"
    return not any(fnmatch(quantizer, pattern) for pattern in excluded_patterns(qtype))


def quantized_layer_names(linears: Mapping[str, int], qtype: str) -> list[str]:
    """The names, among `linears` (Linear layer name -> input width), that `qtype` quantizes."""
    return sorted(name for name, width in linears.items() if is_quantized(name, width, qtype))
