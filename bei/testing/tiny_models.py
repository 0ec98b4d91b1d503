"""Tiny RANDOM checkpoints, written offline exactly as a Hugging Face / sentence-transformers repo.

`make_checkpoint(folder, model_type, task, ...)` writes config.json + model.safetensors (through
transformers' `save_pretrained`), a fast tokenizer trained here with the `tokenizers` library
(tokenizer.json, tokenizer_config.json, special_tokens_map.json) and, for embed / sparse, the
sentence-transformers module files (modules.json, 1_Pooling/, N_Dense/, N_Normalize/ or
1_SpladePooling/, sentence_bert_config.json, config_sentence_transformers.json).

`SUPPORTED` maps each model_type to the tasks it can be made for (checked with the smoke loop in
`python bei/testing/tiny_models.py`); `TEXTS` are sentences for parity tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from bei.testing.tiny_authors import GTE_NTK as GTE_NTK  # (the tests' import of it)
from bei.testing.tiny_authors import edit_config, gte_authors_format, jina_lora_format, nomic_public_config
from bei.testing.tiny_authors import write_json as _write_json
from bei.testing.tiny_tokenizers import FAMILY, SPECIALS, save_tokenizer
from bei.testing.tiny_tokenizers import TEXTS as TEXTS  # the parity sentences, also in the tokenizers' corpus

ENCODERS = ("bert", "roberta", "xlm-roberta", "modernbert", "distilbert", "mpnet", "electra", "deberta-v2", "nomic_bert", "eurobert", "gte",
            "jina_embeddings_v3")  # fmt: skip
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
MODEL_TYPES = ENCODERS + DECODERS
TASKS = ("embed", "rerank", "classify", "ner", "sparse")

SUPPORTED: dict[str, tuple[str, ...]] = {
    "bert": ("embed", "rerank", "classify", "ner", "sparse"),
    "roberta": ("embed", "rerank", "classify", "ner", "sparse"),
    "xlm-roberta": ("embed", "rerank", "classify", "ner"),
    "modernbert": ("embed", "rerank", "classify", "ner", "sparse"),
    "distilbert": ("embed", "rerank", "classify", "ner", "sparse"),
    "mpnet": ("embed", "rerank", "classify", "ner"),
    "electra": ("embed", "rerank", "classify", "ner"),
    "deberta-v2": ("embed", "rerank", "classify", "ner"),
    "nomic_bert": ("embed", "rerank", "classify", "ner"),
    "eurobert": ("embed", "rerank", "classify", "ner"),
    "gte": ("embed", "rerank", "classify", "ner"),
    "jina_embeddings_v3": ("embed", "rerank", "classify", "ner"),
    "llama": ("embed", "rerank", "classify", "ner"),
    "mistral": ("embed", "rerank", "classify", "ner"),
    "qwen2": ("embed", "rerank", "classify", "ner"),
    "qwen3": ("embed", "rerank", "classify", "ner"),
    "gemma2": ("embed", "rerank", "classify", "ner"),
    "gemma3_text": ("embed",),  # EmbeddingGemma: bidirectional attention
}

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC")
CLASS_LABELS = ("LABEL_A", "LABEL_B", "LABEL_C", "LABEL_D", "LABEL_E", "LABEL_F", "LABEL_G", "LABEL_H")


# --- models ---------------------------------------------------------------------------------
def _config(model_type: str, tok: Tokenizer, task: str, num_labels: int) -> Any:
    import transformers

    family = FAMILY[model_type]
    ids = {role: tok.token_to_id(t) for role, t in SPECIALS[family].items()}
    vocab = tok.get_vocab_size()
    common: dict[str, Any] = {"vocab_size": vocab}
    if task == "rerank":
        common["num_labels"] = 1
    elif task == "classify":
        if not 2 <= num_labels <= len(CLASS_LABELS):
            raise ValueError(f"num_labels must be 2..{len(CLASS_LABELS)}")
        common["id2label"] = {i: CLASS_LABELS[i] for i in range(num_labels)}
        common["label2id"] = {v: k for k, v in common["id2label"].items()}
    elif task == "ner":
        common["id2label"] = dict(enumerate(NER_LABELS))
        common["label2id"] = {v: k for k, v in common["id2label"].items()}
    # encoders: init std 0.2 (not 0.02) so that attention mixes tokens and the [CLS] state (and so
    # sequence-classification logits) differs from input to input
    enc: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    common_enc: dict[str, Any] = {**common, "initializer_range": 0.2}
    if model_type == "bert":
        return transformers.BertConfig(**common_enc, **enc, max_position_embeddings=128, type_vocab_size=2, pad_token_id=ids["pad_token"])
    if model_type in ("roberta", "xlm-roberta"):
        cls = transformers.RobertaConfig if model_type == "roberta" else transformers.XLMRobertaConfig
        return cls(
            **common_enc,
            **enc,
            max_position_embeddings=130,
            type_vocab_size=1,
            pad_token_id=ids["pad_token"],
            bos_token_id=ids["bos_token"],
            eos_token_id=ids["eos_token"],
        )
    if model_type == "distilbert":
        return transformers.DistilBertConfig(
            **common_enc, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128, pad_token_id=ids["pad_token"]
        )
    if model_type == "mpnet":  # relative position buckets as all-mpnet-base-v2 (32), positions from pad + 1
        return transformers.MPNetConfig(
            **common_enc, **enc, max_position_embeddings=130, pad_token_id=ids["pad_token"],
            bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
        )  # fmt: skip
    if model_type == "electra":  # a discriminator whose embeddings (16) are projected to the hidden size (32)
        return transformers.ElectraConfig(
            **common_enc, **enc, embedding_size=16, max_position_embeddings=128, type_vocab_size=2, pad_token_id=ids["pad_token"]
        )
    if model_type == "deberta-v2":  # DeBERTa-v3's settings: shared keys, log buckets, c2p + p2c, no absolute positions
        relative: dict[str, Any] = {  # read by DebertaV2Config, not all in its signature
            "relative_attention": True, "position_buckets": 16, "max_relative_positions": -1, "norm_rel_ebd": "layer_norm",
            "share_att_key": True, "pos_att_type": ["p2c", "c2p"], "position_biased_input": False, "layer_norm_eps": 1e-7,
            "pooler_hidden_size": 32, "pooler_hidden_act": "gelu", "pooler_dropout": 0,
        }  # fmt: skip
        return transformers.DebertaV2Config(
            **common_enc, **enc, max_position_embeddings=128, type_vocab_size=0, pad_token_id=ids["pad_token"], **relative
        )
    if model_type == "nomic_bert":
        nomic: dict[str, Any] = {"max_position_embeddings": 128, "type_vocab_size": 2, "pad_token_id": ids["pad_token"]}
        return transformers.NomicBertConfig(**common_enc, **enc, **nomic)
    if model_type == "gte":  # transformers' native GTE (gte-multilingual-base's layout): XLM-R's tokenizer
        gte: dict[str, Any] = {"max_position_embeddings": 128, "type_vocab_size": 1, "pad_token_id": ids["pad_token"]}
        return transformers.GteConfig(**common_enc, **enc, **gte)
    if model_type == "jina_embeddings_v3":  # XLM-R with rotary positions (jina-embeddings-v3): XLM-R's tokenizer
        jina: dict[str, Any] = {"max_position_embeddings": 128, "type_vocab_size": 1, "pad_token_id": ids["pad_token"]}
        return transformers.JinaEmbeddingsV3Config(**common_enc, **enc, **jina)
    if model_type == "eurobert":  # Llama's layers, bidirectional
        euro: dict[str, Any] = {
            "num_key_value_heads": 2, "max_position_embeddings": 128, "pad_token_id": ids["pad_token"],
            "bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"], "tie_word_embeddings": False,
        }  # fmt: skip
        return transformers.EuroBertConfig(**common_enc, **enc, **euro)
    if model_type == "modernbert":
        return transformers.ModernBertConfig(
            **common_enc,
            **enc,
            max_position_embeddings=128,
            global_attn_every_n_layers=2,  # type: ignore[call-arg]  # read by transformers' config, not in its signature
            local_attention=64,
            pad_token_id=ids["pad_token"],
            bos_token_id=ids["cls_token"],
            eos_token_id=ids["sep_token"],
            cls_token_id=ids["cls_token"],
            sep_token_id=ids["sep_token"],
        )
    dec: dict[str, Any] = {
        **common,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": ids["pad_token"],
        "bos_token_id": ids["bos_token"],
        "eos_token_id": ids["eos_token"],
        "tie_word_embeddings": False,
    }
    if model_type == "llama":
        return transformers.LlamaConfig(**dec)
    if model_type == "mistral":
        return transformers.MistralConfig(**dec, sliding_window=None, head_dim=8)
    if model_type == "qwen2":
        return transformers.Qwen2Config(**dec, use_sliding_window=False)
    if model_type == "qwen3":
        return transformers.Qwen3Config(**dec, head_dim=8, use_sliding_window=False)
    if model_type == "gemma2":
        return transformers.Gemma2Config(**dec, head_dim=8, query_pre_attn_scalar=8, sliding_window=64)
    if model_type == "gemma3_text":  # EmbeddingGemma's settings: bidirectional, a window (|i - j| <= 4) the texts exceed
        return transformers.Gemma3TextConfig(
            **dec, head_dim=8, query_pre_attn_scalar=8, sliding_window=8, use_bidirectional_attention=True,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    raise ValueError(f"unknown model_type {model_type!r}; one of {', '.join(MODEL_TYPES)}")


_AUTO = {
    "embed": "AutoModel",
    "rerank": "AutoModelForSequenceClassification",
    "classify": "AutoModelForSequenceClassification",
    "ner": "AutoModelForTokenClassification",
    "sparse": "AutoModelForMaskedLM",
}


def _rescale_heads(model: torch.nn.Module, n_out: int) -> None:
    """Re-draw the classification head so logits are O(1) and vary between inputs (init std 0.02 is flat)."""
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and module.out_features == n_out
            and (name.startswith(("classifier", "score")) or name.endswith(("out_proj", "classifier", "score")))
        ):
            with torch.no_grad():
                module.weight.normal_(0.0, 1.0 / module.in_features**0.5)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1)


def _pooling_config(pooling: str | Sequence[str], hidden: int, include_prompt: bool) -> dict[str, Any]:
    if isinstance(pooling, str) and pooling.startswith("new:"):
        name = pooling[len("new:") :]
        modes: str | list[str] = name.split("+") if "+" in name else name
        for mode in [modes] if isinstance(modes, str) else modes:
            if mode not in POOLING_MODES:
                raise ValueError(f"pooling mode {mode!r} not in {POOLING_MODES}")
        return {"embedding_dimension": hidden, "pooling_mode": modes, "include_prompt": include_prompt}
    names = [pooling] if isinstance(pooling, str) else list(pooling)
    for mode in names:
        if mode not in POOLING_MODES:
            raise ValueError(f"pooling mode {mode!r} not in {POOLING_MODES}")
    return {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": "cls" in names,
        "pooling_mode_mean_tokens": "mean" in names,
        "pooling_mode_max_tokens": "max" in names,
        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens" in names,
        "pooling_mode_weightedmean_tokens": "weightedmean" in names,
        "pooling_mode_lasttoken": "lasttoken" in names,
        "include_prompt": include_prompt,
    }


def _n_modes(pooling: str | Sequence[str]) -> int:
    if isinstance(pooling, str):
        return len(pooling.removeprefix("new:").split("+"))
    return len(set(pooling))


_ST_VERSION = {"sentence_transformers": "6.2.0", "transformers": "5.23.0", "pytorch": "2.13.0"}


def make_checkpoint(
    folder: Path,
    model_type: str,
    task: str,
    *,
    pooling: str | list[str] = "mean",
    include_prompt: bool = True,
    normalize: bool = False,
    dense: Sequence[tuple[int, str]] = (),
    num_labels: int = 2,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    padding_side: str | None = None,
    max_seq_length: int | None = None,
    seed: int = 0,
    bge_m3: bool = False,
    gte_new: dict[str, Any] | None = None,
    dense_bias: bool = True,
    config_fields: dict[str, Any] | None = None,
    jina_lora: bool = False,
) -> Path:
    """Write a tiny random checkpoint of `model_type` for `task` into `folder`; returns `folder`.

    pooling: a mode ("mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken") or a list of
    them, written in the legacy `pooling_mode_*` flag spelling; "new:<mode>" or "new:<mode>+<mode>" writes
    the newer `pooling_mode` spelling. dense: (out_features, "tanh" | "identity") per Dense module, with a
    bias unless `dense_bias` is False (EmbeddingGemma's are bias-free).
    bge_m3: an embedder with bge-m3's sparse_linear.pt and colbert_linear.pt (torch.save'd Linear state
    dicts, as BAAI/bge-m3 ships them; its ColBERT width is the hidden size). gte_new (model_type gte
    only): the checkpoint in GTE's authors' format (`model_type: new`), `rope_scaling` from this
    mapping's key of that name (e.g. `GTE_NTK`; None: none). jina_lora (jina_embeddings_v3 embed only):
    the checkpoint as jinaai/jina-embeddings-v3 ships it, with task LoRA adapters (`jina_lora_format`).
    config_fields: set on the config before the model is made, so the weights have what they ask for
    (e.g. DeBERTa-v2's `conv_kernel_size`).
    """
    import transformers

    if model_type not in SUPPORTED:
        raise ValueError(f"unknown model_type {model_type!r}; one of {', '.join(SUPPORTED)}")
    if task not in SUPPORTED[model_type]:
        raise ValueError(f"{model_type} does not support task {task!r}; it supports {SUPPORTED[model_type]}")
    if default_prompt_name is not None and default_prompt_name not in (prompts or {}):
        raise ValueError(f"default_prompt_name {default_prompt_name!r} is not in prompts")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    causal = model_type in DECODERS
    side = padding_side or ("left" if causal else "right")
    positions = 128
    tok = save_tokenizer(folder, model_type, side, max_seq_length or positions)

    torch.manual_seed(seed)
    config = _config(model_type, tok, task, num_labels)
    for key, value in (config_fields or {}).items():
        setattr(config, key, value)
    model = getattr(transformers, _AUTO[task]).from_config(config)
    if task in ("rerank", "classify", "ner"):
        _rescale_heads(model, config.num_labels)
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)  # (NomicBERT: under the public checkpoints' key names)
    if model_type == "nomic_bert":
        nomic_public_config(folder, config)
    elif model_type == "eurobert":  # as EuroBERT-210m's: its code's auto_map, `clf_pooling`
        code = "EuroBERT/EuroBERT-210m--modeling_eurobert."
        auto_map = {"AutoConfig": "EuroBERT/EuroBERT-210m--configuration_eurobert.EuroBertConfig", "AutoModel": code + "EuroBertModel"}
        edit_config(folder, {"auto_map": auto_map, "clf_pooling": config.classifier_pooling, "classifier_pooling": None})
    elif model_type == "gte" and gte_new is not None:
        gte_authors_format(folder, gte_new.get("rope_scaling"))

    st_config = {"__version__": _ST_VERSION, "prompts": dict(prompts or {}), "default_prompt_name": default_prompt_name}
    if task == "embed":
        hidden = config.hidden_size
        modules: list[dict[str, Any]] = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        _write_json(folder / "1_Pooling" / "config.json", _pooling_config(pooling, hidden, include_prompt))
        in_features = hidden * _n_modes(pooling)
        for out_features, activation in dense:
            idx = len(modules)
            sub = f"{idx}_Dense"
            if activation not in ("tanh", "identity"):
                raise ValueError(f"dense activation {activation!r} is not 'tanh' or 'identity'")
            linear = torch.nn.Linear(in_features, out_features, bias=dense_bias)
            _write_json(
                folder / sub / "config.json",
                {
                    "in_features": in_features,
                    "out_features": out_features,
                    "bias": dense_bias,
                    "activation_function": "torch.nn.modules.activation.Tanh"
                    if activation == "tanh"
                    else "torch.nn.modules.linear.Identity",
                },
            )
            weights = {"linear.weight": linear.weight.detach().contiguous()}
            if linear.bias is not None:
                weights["linear.bias"] = linear.bias.detach().contiguous()
            save_file(weights, str(folder / sub / "model.safetensors"))
            modules.append({"idx": idx, "name": str(idx), "path": sub, "type": "sentence_transformers.models.Dense"})
            in_features = out_features
        if bge_m3:
            for name, out in (("sparse_linear.pt", 1), ("colbert_linear.pt", hidden)):
                head = torch.nn.Linear(hidden, out)
                torch.nn.init.normal_(head.weight, std=0.2)
                torch.save(head.state_dict(), folder / name)
        if normalize:
            idx = len(modules)
            (folder / f"{idx}_Normalize").mkdir(exist_ok=True)
            modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize", "type": "sentence_transformers.models.Normalize"})
        _write_json(folder / "modules.json", modules)
        _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length or 64, "do_lower_case": False})
        _write_json(
            folder / "config_sentence_transformers.json", {"model_type": "SentenceTransformer", **st_config, "similarity_fn_name": "cosine"}
        )
        if jina_lora:
            jina_lora_format(folder)
    elif task == "sparse":
        _write_json(
            folder / "modules.json",
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.sparse_encoder.models.MLMTransformer"},
                {"idx": 1, "name": "1", "path": "1_SpladePooling", "type": "sentence_transformers.sparse_encoder.models.SpladePooling"},
            ],
        )
        _write_json(
            folder / "1_SpladePooling" / "config.json",
            {
                "pooling_strategy": "max",
                "activation_function": "relu",
                "word_embedding_dimension": config.vocab_size,
            },
        )
        _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length or 64, "do_lower_case": False})
        _write_json(folder / "config_sentence_transformers.json", {"model_type": "SparseEncoder", **st_config, "similarity_fn_name": "dot"})
    return folder


# --- smoke loop: `python bei/testing/tiny_models.py` ---------------------------------------------
def _smoke(model_type: str, task: str, folder: Path) -> str:
    make_checkpoint(folder, model_type, task)
    if task == "embed":
        from sentence_transformers import SentenceTransformer

        out = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
        return f"embed {out.shape}"
    if task in ("rerank", "classify"):
        from sentence_transformers import CrossEncoder

        scores = CrossEncoder(str(folder), device="cpu").predict([(TEXTS[2], t) for t in TEXTS])
        assert scores.reshape(len(TEXTS), -1).std(axis=0).min() > 1e-3, f"scores hardly vary: {scores}"
        return f"{task} {scores.shape}"
    if task == "sparse":
        from sentence_transformers import SparseEncoder

        sparse = SparseEncoder(str(folder), device="cpu").encode(TEXTS)
        return f"sparse {tuple(sparse.shape)}"
    from transformers import AutoTokenizer, pipeline

    AutoTokenizer.from_pretrained(str(folder))
    Tokenizer.from_file(str(folder / "tokenizer.json"))
    ents = pipeline("token-classification", model=str(folder), device="cpu")(TEXTS[3])
    assert ents and all("start" in e and e["start"] is not None for e in ents)
    return f"ner {len(ents)} tokens"


if __name__ == "__main__":
    import os
    import sys
    import tempfile
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for mt in MODEL_TYPES:
            for tk in TASKS:
                t0 = time.perf_counter()
                try:
                    if tk not in SUPPORTED[mt]:
                        continue
                    result = _smoke(mt, tk, Path(tmp) / f"{mt}-{tk}")
                    print(f"ok   {mt:12s} {tk:8s} {result}  ({time.perf_counter() - t0:.2f}s)")
                except Exception as err:  # noqa: BLE001
                    failures += 1
                    print(f"FAIL {mt:12s} {tk:8s} {type(err).__name__}: {err}")
    sys.exit(1 if failures else 0)
