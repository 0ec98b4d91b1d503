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

GTE in its authors' format (`model_type: new`, Alibaba-NLP/new-impl's modeling.py: gte-base-en-v1.5,
gte-large-en-v1.5, gte-multilingual-base / -reranker-base) is transformers' native `gte` (the same
layers and weight names; transformers drops the `new.` prefix of the heads) but for the config: a
`rope_theta` and the authors' fixed NTK scaling `rope_scaling: {type: ntk, factor: f}`. Their
`NTKScalingRotaryEmbedding` (without `mixed_b`) computes inv_freq_i = 1 / (theta f)^(2i/d) / f^(2/d)
(d the head size): the default frequencies of base theta * f, all divided by f^(2/d), which is
transformers' `linear` rope type with factor f^(2/d). So `native_config` writes
`rope_parameters: {rope_type: linear, rope_theta: theta * f, factor: f^(2/d)}` (without scaling:
`default`, theta) and `model_type: gte`; the settings of the authors' code that neither
implementation has are refused by name (`_NEW_FIXED`, mixed NTK's `mixed_b`, other scaling types).
"""

from __future__ import annotations

from typing import Any

from bei.errors import ModelError

# model types whose public checkpoints name custom code in auto_map, built by bei itself
REMOTE_CODE_NATIVE: frozenset[str] = frozenset({"nomic_bert", "eurobert", "new"})
# jina-embeddings-v3's code: an xlm-roberta whose auto_map names it (with rotary positions)
JINA_V3_CODE = "jinaai/xlm-roberta-flash-implementation"

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


# settings of the authors' GTE code (Alibaba-NLP/new-impl): the value bei and transformers' `gte` implement
_NEW_FIXED: dict[str, tuple[Any, ...]] = {
    "position_embedding_type": ("rope",),
    "layer_norm_type": ("layer_norm",),
    "pack_qkv": (True,),
    "logn_attention_scale": (False,),
}
# keys of the authors' config that only choose how their code computes (xformers, unpadding): dropped
_NEW_COMPUTE_ONLY = ("unpad_inputs", "use_memory_efficient_attention", "logn_attention_clip1", "rope_theta", "rope_scaling")


def _refuse_unsupported(config: dict[str, Any], fixed: dict[str, tuple[Any, ...]], what: str) -> None:
    for key, allowed in fixed.items():
        if key in config and config[key] not in allowed:
            raise ModelError(
                f"config.json {key}={config[key]!r} is not supported for {what} "
                f"(bei's {what} and transformers' implement {key}={allowed[0]!r})"
            )


def _gte_rope(config: dict[str, Any]) -> dict[str, Any]:
    """The authors' `rope_theta` / `rope_scaling` as transformers' `rope_parameters` (module docstring)."""
    theta = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    kind = (scaling.get("type") or scaling.get("rope_type")) if isinstance(scaling, dict) else None
    if kind != "ntk" or not isinstance(scaling.get("factor"), (int, float)) or scaling["factor"] < 1:
        fixed = "bei implements the fixed NTK scaling, {type: ntk, factor >= 1}"
        raise ModelError(f"config.json rope_scaling={scaling!r} is not supported for new (GTE): {fixed}")
    if scaling.get("mixed_b") is not None:
        mixed = f"rope_scaling.mixed_b={scaling['mixed_b']!r} (mixed NTK)"
        raise ModelError(f"config.json {mixed} is not supported for new (GTE); bei implements the fixed NTK scaling")
    factor = float(scaling["factor"])
    head_dim = int(config["hidden_size"]) // int(config["num_attention_heads"])
    return {"rope_type": "linear", "rope_theta": theta * factor, "factor": factor ** (2 / head_dim)}


# settings of the authors' XLM-RoBERTa flash code: the value transformers' jina_embeddings_v3 implements
_JINA_FIXED: dict[str, tuple[Any, ...]] = {
    "position_embedding_type": ("rotary",),
    "window_size": (None, [-1, -1]),
}
# keys of jina-embeddings-v3's config that choose how the authors' code computes, or its adapters (merged at build)
_JINA_DROPPED = (
    "auto_map", "rotary_emb_base", "use_flash_attn", "fused_dropout_add_ln", "emb_pooler", "load_trained_adapters",
    "lora_main_params_trainable", "lora_dropout_p", "use_reentrant", "output_past",
)  # fmt: skip


def is_jina_v3(config: dict[str, Any]) -> bool:
    """jina-embeddings-v3 as published: an xlm-roberta with rotary positions whose auto_map names the authors' code."""
    auto_map = config.get("auto_map")
    classes = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    return (
        config.get("model_type") == "xlm-roberta"
        and config.get("position_embedding_type") == "rotary"
        and any(str(c).startswith(JINA_V3_CODE) for c in classes)
    )


def builds_remote_code(config: dict[str, Any]) -> bool:
    """Whether bei builds this checkpoint written for its authors' code (its `auto_map`) by its own implementation."""
    return config.get("model_type") in REMOTE_CODE_NATIVE or is_jina_v3(config)


def _jina_v3(config: dict[str, Any]) -> dict[str, Any]:
    _refuse_unsupported(config, _JINA_FIXED, "jina-embeddings-v3")
    out = {k: v for k, v in config.items() if k not in _JINA_FIXED and k not in _JINA_DROPPED}
    theta = float(config.get("rotary_emb_base") or 10000.0)  # XLMRobertaFlashConfig's default
    return {**out, "model_type": "jina_embeddings_v3", "architectures": ["JinaEmbeddingsV3Model"],
            "rope_parameters": {"rope_type": "default", "rope_theta": theta}}  # fmt: skip


def native_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` in transformers' native spelling (unchanged for a model type that needs none)."""
    if is_jina_v3(config):
        return _jina_v3(config)
    if config.get("model_type") == "new":  # GTE in its authors' format
        _refuse_unsupported(config, _NEW_FIXED, "new (GTE)")
        out = {k: v for k, v in config.items() if k not in _NEW_FIXED and k not in _NEW_COMPUTE_ONLY}
        return {**out, "model_type": "gte", "rope_parameters": _gte_rope(config)}
    if config.get("model_type") == "eurobert":  # EuroBERT's code reads Llama's keys, and `clf_pooling`
        out = {k: v for k, v in config.items() if k != "clf_pooling"}
        if config.get("clf_pooling") is not None:
            out["classifier_pooling"] = config["clf_pooling"]
        return out
    if config.get("model_type") != "nomic_bert":
        return config
    _refuse_unsupported(config, _NOMIC_FIXED, "nomic_bert")
    out = {k: v for k, v in config.items() if k not in _NOMIC_NAMES}
    for old, new in _NOMIC_NAMES.items():
        if config.get(old) is not None:
            out[new] = config[old]
    if config.get("rotary_emb_base") is not None:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": float(config["rotary_emb_base"])}
    if "activation_function" in config:
        out["hidden_act"] = "silu"  # SwiGLU: silu(fc12(x)) * fc11(x)
    return out
