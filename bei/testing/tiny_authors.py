"""Tiny checkpoints rewritten as their authors' code writes them (bei/testing/tiny_models.py makes the
native ones): NomicBERT's public config spelling, GTE's `model_type: new`, jina-embeddings-v3 with its
task LoRA adapters; and the small file helpers both modules use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bei.modeling.remote_code import JINA_V3_CODE


def nomic_public_config(folder: Path, config: Any) -> None:
    """config.json as nomic-embed-text-v1.5 writes it (its code's spelling and auto_map), keeping the
    native keys that transformers' NomicBertConfig reads (it ignores n_embd, ...: the references
    would otherwise load the default sizes)."""
    code = "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert."
    edit_config(
        folder,
        {
            "auto_map": {
                "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
                "AutoModel": code + "NomicBertModel",
                "AutoModelForMaskedLM": code + "NomicBertForPreTraining",
                "AutoModelForSequenceClassification": code + "NomicBertForSequenceClassification",
                "AutoModelForTokenClassification": code + "NomicBertForTokenClassification",
            },
            "n_embd": config.hidden_size, "n_layer": config.num_hidden_layers, "n_head": config.num_attention_heads,
            "n_inner": config.intermediate_size, "n_positions": config.max_position_embeddings, "layer_norm_epsilon": config.layer_norm_eps,
            "rotary_emb_base": 1000, "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False, "rotary_scaling_factor": None,
            "activation_function": "swiglu", "prenorm": False, "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
            "causal": False, "max_trained_positions": 2048, "use_rms_norm": False,
        },
    )  # fmt: skip


# GTE in its authors' format (Alibaba-NLP/new-impl), as gte-base-en-v1.5 / gte-multilingual-base write it
_NEW_ARCHITECTURES = {"GteModel": "NewModel", "GteForSequenceClassification": "NewForSequenceClassification",
                      "GteForTokenClassification": "NewForTokenClassification"}  # fmt: skip
GTE_NTK = {"type": "ntk", "factor": 2.0}


def gte_authors_format(folder: Path, rope_scaling: dict[str, Any] | None) -> None:
    """A native `gte` checkpoint rewritten as the authors' `new`: the heads' base model under `new.`,
    config.json in NewConfig's keys (rope_theta, rope_scaling, pack_qkv, ...) with its auto_map."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    state = {("new." + k.removeprefix("gte.") if k.startswith("gte.") else k): v for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    code = "Alibaba-NLP/new-impl--modeling."
    architecture = _NEW_ARCHITECTURES[config["architectures"][0]]
    edit_config(
        folder,
        {
            "model_type": "new", "architectures": [architecture], "rope_parameters": None,
            "auto_map": {"AutoConfig": "Alibaba-NLP/new-impl--configuration.NewConfig", "AutoModel": code + "NewModel",
                         "AutoModelForSequenceClassification": code + "NewForSequenceClassification",
                         "AutoModelForTokenClassification": code + "NewForTokenClassification"},
            "rope_theta": 20000.0, "rope_scaling": rope_scaling, "position_embedding_type": "rope", "layer_norm_type": "layer_norm",
            "pack_qkv": True, "unpad_inputs": False, "use_memory_efficient_attention": False,
            "logn_attention_scale": False, "logn_attention_clip1": False,
        },
    )  # fmt: skip


# jina-embeddings-v3 as jinaai publishes it: its task LoRA adapters and their instructions
JINA_TASKS = {
    "retrieval.query": "Represent the query for retrieving evidence documents: ",
    "retrieval.passage": "Represent the document for retrieval: ",
    "separation": "",
    "classification": "",
    "text-matching": "",
}
_JINA_LORA_LAYERS = ("word_embeddings", "token_type_embeddings", "Wqkv", "out_proj", "fc1", "fc2", "pooler.dense")


def jina_lora_format(folder: Path, rank: int = 2, alpha: float = 3.0, seed: int = 0) -> None:
    """A native `jina_embeddings_v3` embedder rewritten as jinaai/jina-embeddings-v3 ships it: config.json
    in XLMRobertaFlashConfig's keys with its auto_map (model_type xlm-roberta, rotary_emb_base,
    lora_adaptations, ...), and the weights under `roberta.` with a random LoRA adapter per task on
    every Linear and Embedding (torch parametrize's names: `X.parametrizations.weight.original`,
    `X.parametrizations.weight.0.lora_A` / `lora_B`, the tasks stacked on dimension 0)."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    generator = torch.Generator().manual_seed(seed)
    tasks = len(JINA_TASKS)
    state: dict[str, torch.Tensor] = {}
    for key, value in load_file(str(weights)).items():
        layer = key.removesuffix(".weight")
        if not key.endswith(".weight") or not layer.endswith(_JINA_LORA_LAYERS):
            state["roberta." + key] = value
            continue
        base = f"roberta.{layer}.parametrizations.weight."
        rows, cols = value.shape
        if "embeddings" in layer:  # Embedding [vocab, dim]: W + s * A @ B
            a, b = torch.randn(tasks, rows, rank, generator=generator), torch.randn(tasks, rank, cols, generator=generator)
        else:  # Linear [out, in]: W + s * B @ A
            a, b = torch.randn(tasks, rank, cols, generator=generator), torch.randn(tasks, rows, rank, generator=generator)
        state[base + "original"], state[base + "0.lora_A"], state[base + "0.lora_B"] = value, a * 0.1, b * 0.1
    save_file(state, str(weights), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    code = JINA_V3_CODE + "--"
    edit_config(
        folder,
        {
            "model_type": "xlm-roberta", "architectures": ["XLMRobertaLoRA"], "rope_parameters": None,
            "auto_map": {"AutoConfig": code + "configuration_xlm_roberta.XLMRobertaFlashConfig",
                         "AutoModel": code + "modeling_lora.XLMRobertaLoRA",
                         "AutoModelForPreTraining": code + "modeling_xlm_roberta.XLMRobertaForPreTraining"},
            "position_embedding_type": "rotary", "rotary_emb_base": config["rope_parameters"]["rope_theta"],
            "lora_adaptations": list(JINA_TASKS), "task_instructions": JINA_TASKS, "lora_rank": rank, "lora_alpha": alpha,
            "lora_dropout_p": 0.0, "lora_main_params_trainable": False, "load_trained_adapters": True,
            "use_flash_attn": True, "emb_pooler": None, "matryoshka_dimensions": [8, 16, 32], "truncate_dim": None,
        },
    )  # fmt: skip
    st_config = folder / "config_sentence_transformers.json"
    if st_config.exists():
        data = json.loads(st_config.read_text())
        write_json(st_config, {**data, "prompts": dict(JINA_TASKS), "default_prompt_name": None})


def edit_config(folder: Path, edits: dict[str, Any]) -> None:
    """Set keys of `folder/config.json` (a None value removes the key)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in edits.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
