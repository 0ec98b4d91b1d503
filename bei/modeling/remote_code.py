"""Checkpoints published with their authors' modeling code (`auto_map`), which bei builds with an
implementation of its own instead of running that code.

NomicBERT (`model_type: nomic_bert`: nomic-embed-text-v1 / v1.5) writes its config.json in its
code's spelling (`n_embd`, `n_layer`, `n_head`, `n_inner`, `layer_norm_epsilon`, `n_positions`,
`rotary_emb_base`, `activation_function: swiglu`). transformers' native NomicBertConfig reads
`hidden_size`, ... and ignores those (nomic-embed-text-v1.5 works there only because its sizes are
the defaults), so `native_config` rewrites a config into the native spelling: what the ONNX export
loads transformers with, what detection and the packed module read. The weights need no renaming
for transformers (its conversion mapping reads the public names); the packed module reads both.
Settings of the authors' code that neither implementation has are refused by name.

EuroBERT (`model_type: eurobert`) writes Llama's keys, which transformers' native EuroBertConfig
reads, except its classifier's pooling: `clf_pooling` there, `classifier_pooling` here.
"""

from __future__ import annotations

from typing import Any

from bei.errors import ModelError

# model types whose public checkpoints name custom code in auto_map, built by bei itself
REMOTE_CODE_NATIVE: frozenset[str] = frozenset({"nomic_bert", "eurobert"})

_NOMIC_NAMES = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_inner": "intermediate_size",
    "layer_norm_epsilon": "layer_norm_eps",
    "n_positions": "max_position_embeddings",
}
# settings of the authors' NomicBERT code: the value both implementations have (None: absent is fine too)
_NOMIC_FIXED: dict[str, tuple[Any, ...]] = {
    "activation_function": ("swiglu",),
    "prenorm": (False,),
    "parallel_block": (False,),
    "qkv_proj_bias": (False,),
    "mlp_fc1_bias": (False,),
    "mlp_fc2_bias": (False,),
    "use_rms_norm": (False,),
    "causal": (False,),
    "rotary_emb_fraction": (1.0,),
    "rotary_emb_interleaved": (False,),
    "rotary_scaling_factor": (None,),
    "rotary_emb_scale_base": (None,),
    "num_experts": (None, 0),
    "moe_every_n_layers": (None, 0),
}


def native_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` in transformers' native spelling (unchanged for a model type that needs none)."""
    if config.get("model_type") == "eurobert":  # EuroBERT's code reads Llama's keys, and `clf_pooling`
        out = {k: v for k, v in config.items() if k != "clf_pooling"}
        if config.get("clf_pooling") is not None:
            out["classifier_pooling"] = config["clf_pooling"]
        return out
    if config.get("model_type") != "nomic_bert":
        return config
    for key, allowed in _NOMIC_FIXED.items():
        if key in config and config[key] not in allowed:
            raise ModelError(
                f"config.json {key}={config[key]!r} is not supported for nomic_bert "
                f"(bei's NomicBERT and transformers' implement {key}={allowed[0]!r})"
            )
    out = {k: v for k, v in config.items() if k not in _NOMIC_NAMES}
    for old, new in _NOMIC_NAMES.items():
        if config.get(old) is not None:
            out[new] = config[old]
    if config.get("rotary_emb_base") is not None:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": float(config["rotary_emb_base"])}
    if "activation_function" in config:
        out["hidden_act"] = "silu"  # SwiGLU: silu(fc12(x)) * fc11(x)
    return out
