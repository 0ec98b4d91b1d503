"""Read a checkpoint folder into a `ModelSpec`: task from config.json, pooling from modules.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.files import read_json
from bei.modeling.lora import adapter_tasks, check_adapter, task_instruction
from bei.modeling.m3 import has_m3_heads, read_colbert_dim
from bei.modeling.pooling import PoolingConfig, PoolingMode
from bei.modeling.remote_code import REMOTE_CODE_NATIVE, builds_remote_code, native_config
from bei.modeling.spec import DenseLayer, ModelSpec
from bei.text.chat_template import ChatTemplate, read_chat_template, read_special_tokens

log = logging.getLogger(__name__)

# model_type -> the base_model that serves it
ARCHITECTURES: dict[str, str] = {
    "bert": "encoder_bert",
    "roberta": "encoder_bert",
    "xlm-roberta": "encoder_bert",
    "modernbert": "encoder_bert",
    "distilbert": "encoder_bert",
    "mpnet": "encoder_bert",
    "electra": "encoder_bert",
    "deberta-v2": "encoder_bert",
    "nomic_bert": "encoder_bert",
    "eurobert": "encoder_bert",
    "gte": "encoder_bert",
    "jina_embeddings_v3": "encoder_bert",
    "llama": "encoder",
    "mistral": "encoder",
    "qwen2": "encoder",
    "qwen3": "encoder",
    "gemma2": "encoder",
    "gemma3_text": "encoder",
}

# model types whose embeddings add token type ids (where type_vocab_size > 1): the runtime feeds them
_TOKEN_TYPES = ("bert", "electra", "deberta-v2", "nomic_bert", "jina_embeddings_v3")

_ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}


def _read_json(path: Path) -> Any:
    data = read_json(path)
    if not isinstance(data, (dict, list)):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def _module_kind(entry: dict[str, Any]) -> str:
    """`sentence_transformers.models.Pooling` (and newer module paths) -> `Pooling`."""
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def module_dir(checkpoint: Path, name: object) -> Path:
    """The folder of a modules.json entry (`path`), refused when it leads outside the checkpoint."""
    if not isinstance(name, str) or not name:
        raise ModelError(f"{checkpoint / 'modules.json'}: a module's path must be a folder name, not {name!r}")
    root = checkpoint.resolve()
    folder = (root / name).resolve()
    if not folder.is_relative_to(root):
        raise ModelError(f"{checkpoint / 'modules.json'}: module path {name!r} leads outside the checkpoint folder")
    return folder


def _read_modules(path: Path) -> list[dict[str, Any]]:
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return []
    modules = _read_json(modules_file)
    if not isinstance(modules, list):
        raise ModelError(f"{modules_file} must hold a list of modules")
    return sorted(modules, key=lambda m: int(m.get("idx", 0)))


def _read_dense(folder: Path) -> DenseLayer:
    config = _read_json(folder / "config.json")
    activation_name = str(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if activation_name not in _ACTIVATIONS:
        raise ModelError(f"{folder / 'config.json'}: activation_function {activation_name!r} is not one of " + ", ".join(_ACTIVATIONS))
    if not any((folder / name).exists() for name in ("model.safetensors", "pytorch_model.bin")):
        raise ModelError(f"Dense module {folder} has no model.safetensors")
    return DenseLayer(
        path=folder,
        in_features=int(config["in_features"]),
        out_features=int(config["out_features"]),
        bias=bool(config.get("bias", True)),
        activation=_ACTIVATIONS[activation_name],
    )


def detect_task(config: dict[str, Any], modules: list[dict[str, Any]]) -> Task:
    architecture = (config.get("architectures") or [""])[0]
    if architecture.endswith("ForSequenceClassification"):
        labels = config.get("id2label") or {}
        n_labels = int(config.get("num_labels", len(labels) or 2))
        return Task.RERANK if n_labels == 1 or len(labels) == 1 else Task.CLASSIFY
    if architecture.endswith("ForTokenClassification"):
        return Task.NER
    if architecture.endswith("ForMaskedLM") and any(_module_kind(m) in ("SpladePooling", "MLMTransformer") for m in modules):
        return Task.SPARSE
    return Task.EMBED


def _labels(config: dict[str, Any], task: Task, config_path: Path) -> tuple[str, ...]:
    """The label of each output of the head, in output order.

    "id2label is required" means: config.json has an `id2label` mapping that names every output,
    keys 0..n-1. The names transformers writes for a head nobody named (LABEL_0, LABEL_1, ...) are
    accepted, as TEI and transformers' pipelines accept them: they still say which output is which.
    A reranker (one output) needs no name.
    """
    if task not in (Task.CLASSIFY, Task.NER, Task.RERANK):
        return ()
    id2label = config.get("id2label")
    architecture = (config.get("architectures") or ["a classification"])[0]
    if not id2label:
        if task is Task.RERANK:
            return ("score",)
        raise ModelError(
            f"{config_path}: id2label is required for {architecture}: a mapping from each output index "
            '(0, 1, ...) to its label name, e.g. "id2label": {"0": "negative", "1": "positive"}'
        )
    if not isinstance(id2label, dict):
        raise ModelError(f"{config_path}: id2label must be a mapping of output index to label, not {id2label!r}")
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ModelError(f"{config_path}: id2label keys must be output indices 0, 1, ...; got {list(id2label)}") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise ModelError(f"{config_path}: id2label must name outputs 0..{len(by_index) - 1} without gaps; got indices {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))


def _max_seq_len(path: Path, config: dict[str, Any], override: int | None) -> int:
    model_type = config.get("model_type", "")
    positions = int(config.get("max_position_embeddings") or 512)
    if model_type in ("roberta", "xlm-roberta", "camembert", "mpnet"):
        positions -= int(config.get("pad_token_id", 1)) + 1  # position ids start after the pad index
    limit = positions
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        st_max = _read_json(st_config).get("max_seq_length")
        if st_max:
            limit = min(limit, int(st_max))
    if override is not None:
        if override > positions:
            raise ModelError(f"trt_llm.build.max_seq_len: {override} is over the model's {positions} position embeddings")
        limit = override
    return limit


def _padding_side(path: Path, base_model: str) -> str:
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.exists():
        side = _read_json(tokenizer_config).get("padding_side")
        if side in ("left", "right"):
            return str(side)
    return "right"


def _chat_template(path: Path, family: str, task: Task) -> str | None:
    """The template sentence-transformers renders a causal reranker's / classifier's inputs through.

    ST (6.x) applies the tokenizer's chat template (chat_template.jinja, else tokenizer_config.json's
    `chat_template`) whenever there is one, a pair as "query" and "document" messages. A template that
    loses either role (a chat model's stock template) makes ST refuse pairs; such a checkpoint was
    trained on plain pairs, so it keeps the plain pair tokenization here.
    """
    if family != "encoder" or task not in (Task.RERANK, Task.CLASSIFY):
        return None
    template = read_chat_template(path)
    if template is None:
        return None
    failure = ChatTemplate(template, read_special_tokens(path)).pair_roles_failure()
    if failure is not None:
        log.warning("%s: the chat template cannot carry a (query, document) pair (%s); inputs are tokenized as plain pairs", path, failure)
        return None
    return template


def _check_auto_map(config: dict[str, Any], config_path: Path, model_type: str, architecture: str) -> None:
    """A config.json whose `auto_map` names custom code (`trust_remote_code`) is refused: bei runs no
    remote code, and the code's model need not be the model_type's (jina-embeddings-v2 is a
    `bert` with ALiBi in its own modeling file). Model types in `REMOTE_CODE_NATIVE` are the
    exception: bei builds their public checkpoints with its own implementation, names and all."""
    auto_map = config.get("auto_map")
    if not auto_map or builds_remote_code(config):
        return
    classes = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    raise ModelError(
        f"{config_path}: auto_map names custom code ({', '.join(sorted(str(c) for c in classes))[:300]}) for {architecture or model_type}; "
        "bei runs no remote code and builds only the architectures it implements: "
        f"{', '.join(ARCHITECTURES)}; also from checkpoints written for their authors' code: "
        f"{', '.join(sorted(REMOTE_CODE_NATIVE))} (`new`: GTE's own format), and jina-embeddings-v3 (xlm-roberta with rotary positions)"
    )


def read_model_spec(path: Path, *, base_model: str | None = None, max_seq_len: int | None = None, adapter: str | None = None) -> ModelSpec:
    """Read config.json, modules.json and the pooling/dense/normalize modules of a checkpoint.

    adapter: the task LoRA adapter merged at build (`trt_llm.build.adapter`, bei/modeling/lora.py),
    required for a checkpoint that ships adapters and refused for one that does not."""
    config_path = path / "config.json"
    written = _read_json(config_path)
    architecture = (written.get("architectures") or [""])[0]
    _check_auto_map(written, config_path, str(written.get("model_type", "")), architecture)
    config = native_config(written)
    model_type = str(config.get("model_type", ""))  # transformers' native one (`new` -> `gte`)
    check_adapter(config, adapter, str(path))
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"{config_path}: model_type {model_type!r} ({architecture or 'no architectures'}) is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    family = ARCHITECTURES[model_type]
    if base_model is not None and base_model != family:
        raise ModelError(
            f"trt_llm.build.base_model: {base_model!r} does not match the checkpoint's {model_type} "
            f"({architecture}); use base_model: {family}"
        )
    modules = _read_modules(path)
    task = detect_task(config, modules)
    pooling: PoolingConfig | None = None
    normalize = False
    dense: list[DenseLayer] = []
    if task is Task.EMBED:
        pooling_entries = [m for m in modules if _module_kind(m) == "Pooling"]
        if not pooling_entries:
            missing = path / "modules.json" if not modules else path / "1_Pooling" / "config.json"
            raise ModelError(
                f"an embedding checkpoint needs its pooling: missing {missing} "
                "(sentence-transformers' modules.json with a Pooling module and 1_Pooling/config.json)"
            )
        pooling = PoolingConfig.read(module_dir(path, pooling_entries[0].get("path", "1_Pooling")) / "config.json")
        for entry in modules:
            kind = _module_kind(entry)
            if kind == "Dense":
                dense.append(_read_dense(module_dir(path, entry.get("path"))))
            elif kind == "Normalize":
                normalize = True
    elif task is Task.SPARSE:
        pooling = PoolingConfig(modes=(PoolingMode.SPLADE_MAX,))
    hidden_size = int(config.get("hidden_size") or config.get("dim") or 0)
    colbert_dim = 0
    if task is Task.EMBED and has_m3_heads(path):
        task, colbert_dim = Task.EMBED_M3, _m3_heads(path, family, pooling, dense, hidden_size)
    prompts: dict[str, str] = {}
    default_prompt_name: str | None = None
    st_config = path / "config_sentence_transformers.json"
    if st_config.exists():
        data = _read_json(st_config)
        prompts = {str(k): str(v) for k, v in (data.get("prompts") or {}).items()}
        default_prompt_name = data.get("default_prompt_name")
    if adapter is not None:  # the authors' encode(task=...) puts the task's instruction before every input
        # the other tasks' prompts go: their instructions on this task's merged weights would be silently wrong
        others = set(adapter_tasks(config)) - {adapter}
        prompts = {name: text for name, text in prompts.items() if name not in others}
        prompts[adapter] = task_instruction(config, adapter) or prompts.get(adapter, "")
        default_prompt_name = adapter
    return ModelSpec(
        path=path,
        architecture=architecture,
        model_type=model_type,
        base_model=family,
        task=task,
        hidden_size=hidden_size,
        num_heads=int(config.get("num_attention_heads") or config.get("n_heads") or 0),
        max_seq_len=_max_seq_len(path, config, max_seq_len),
        pooling=pooling,
        normalize=normalize,
        dense=tuple(dense),
        labels=_labels(config, task, config_path),
        uses_token_type_ids=model_type in _TOKEN_TYPES and int(config.get("type_vocab_size", 0)) > 1,
        padding_side=_padding_side(path, family),
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        chat_template=_chat_template(path, family, task),
        colbert_dim=colbert_dim,
        adapter=adapter,
    )


def _m3_heads(path: Path, family: str, pooling: PoolingConfig | None, dense: list[DenseLayer], hidden: int) -> int:
    """A bge-m3 checkpoint (sparse_linear.pt, colbert_linear.pt): its ColBERT width, once what bei
    implements of it is checked: an encoder, CLS pooling (its dense vector), no Dense module."""
    if family != "encoder_bert":
        raise ModelError(f"{path}: bge-m3's sparse and ColBERT heads are built on bidirectional encoders only, not on a {family}")
    if pooling is None or pooling.modes != (PoolingMode.CLS,):
        name = pooling.name if pooling else "none"
        raise ModelError(
            f"{path}: a bge-m3 checkpoint (sparse_linear.pt, colbert_linear.pt) pools CLS for its dense vector; its pooling is {name}"
        )
    if dense:
        raise ModelError(f"{path}: a bge-m3 checkpoint with a Dense module is not supported (its dense vector is the CLS row)")
    return read_colbert_dim(path, hidden)
