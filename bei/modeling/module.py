"""The torch module that becomes the engine graph: transformer + pooling + heads, one forward.

Outputs, by task (batch-first, so the runtime can split any output by row):
- embed:    `sentence_embedding` [batch, dim] (pooled, Dense applied; normalization is the runtime's,
            so `/embed` can serve `normalize: false` and `dimensions` can re-normalize after truncation)
- rerank / classify: `logits` [batch, labels]
- ner:      `logits` [batch, seq, labels]
- sparse:   `sparse_embedding` [batch, vocab]
- embed_m3: `token_embeddings` [batch, seq, hidden + 1 + colbert] (bge-m3: bei/modeling/m3.py)
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file

from bei.errors import ModelError
from bei.kinds import GRAPH_OUTPUTS, Task
from bei.modeling.files import read_json
from bei.modeling.lora import checkpoint_state
from bei.modeling.m3 import m3_heads
from bei.modeling.pooling import pool
from bei.modeling.remote_code import builds_remote_code, native_config
from bei.modeling.spec import DenseLayer, ModelSpec

_ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "tanh": torch.nn.Tanh,
    "identity": torch.nn.Identity,
    "relu": torch.nn.ReLU,
    "gelu": torch.nn.GELU,
    "sigmoid": torch.nn.Sigmoid,
}

OUTPUT_NAMES: dict[Task, str] = GRAPH_OUTPUTS


def input_names(spec: ModelSpec) -> list[str]:
    """The graph's inputs, in order: what the runtime feeds for this checkpoint."""
    names = ["input_ids", "attention_mask"]
    if spec.uses_token_type_ids:
        names.append("token_type_ids")
    if spec.pooling is not None and not spec.pooling.include_prompt:
        names.append("prompt_length")
    return names


def dense_module(layer: DenseLayer, load: bool = True) -> torch.nn.Module:
    """A sentence-transformers Dense module; with `load`, its weights from the checkpoint."""
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    if not load:
        return torch.nn.Sequential(linear, _ACTIVATIONS[layer.activation]())
    weights_file = layer.path / "model.safetensors"
    state = (
        load_file(weights_file)
        if weights_file.exists()
        else torch.load(layer.path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    )
    state = {k.removeprefix("linear."): v for k, v in state.items()}
    linear.load_state_dict(state)
    return torch.nn.Sequential(linear, _ACTIVATIONS[layer.activation]())


def auto_class(task: Task) -> Any:
    """The transformers Auto class whose head serves `task`."""
    import transformers

    return {
        Task.EMBED: transformers.AutoModel,
        Task.EMBED_M3: transformers.AutoModel,
        Task.RERANK: transformers.AutoModelForSequenceClassification,
        Task.CLASSIFY: transformers.AutoModelForSequenceClassification,
        Task.NER: transformers.AutoModelForTokenClassification,
        Task.SPARSE: transformers.AutoModelForMaskedLM,
    }[task]


def transformers_config(spec: ModelSpec) -> Any:
    """The checkpoint's transformers config; for a checkpoint written for its authors' code
    (bei/modeling/remote_code.py), its config.json rewritten in transformers' native spelling."""
    import transformers

    written = read_json(spec.path / "config.json")
    if not builds_remote_code(written):
        return transformers.AutoConfig.from_pretrained(str(spec.path))
    native = native_config(written)
    native.pop("auto_map", None)
    return transformers.CONFIG_MAPPING[spec.model_type].from_dict(native)


def load_transformer(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformers model of the checkpoint, with the head its task needs."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers_config(spec)
        if spec.adapter is None:
            model = auto_class(spec.task).from_pretrained(str(spec.path), config=config, dtype=dtype, attn_implementation="eager")
        else:  # the weights with the task's LoRA merged (bei/modeling/lora.py), renamed by transformers' conversion mapping
            state = checkpoint_state(spec.path, native_config(read_json(spec.path / "config.json")), spec.adapter)
            with torch.device("meta"):
                model_class = type(auto_class(spec.task).from_config(config))
            model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load {spec.architecture} from {spec.path}: {err}") from err
    return model.eval()


class EngineModule(torch.nn.Module):
    """transformer -> (pooling -> dense) or head logits; the forward that is exported."""

    def __init__(self, spec: ModelSpec, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.transformer = transformer
        self.dense = torch.nn.Sequential(*[dense_module(layer) for layer in spec.dense])
        self.m3 = m3_heads(spec.m3_columns, spec.path) if spec.task is Task.EMBED_M3 else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        prompt_length: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.transformer(**kwargs)
        if self.spec.task is Task.EMBED:
            assert self.spec.pooling is not None
            hidden = out.last_hidden_state
            pooled = pool(self.spec.pooling, hidden, attention_mask, prompt_length)
            return self.dense(pooled)
        if self.spec.task is Task.SPARSE:
            assert self.spec.pooling is not None
            return pool(self.spec.pooling, out.logits, attention_mask)
        if self.m3 is not None:
            return self.m3(out.last_hidden_state)
        return out.logits


def build_module(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> EngineModule:
    return EngineModule(spec, load_transformer(spec, dtype)).eval()


def linear_layers(spec: ModelSpec) -> dict[str, int]:
    """The transformer's Linear layers as named in the engine module, with their input widths, from
    the checkpoint's config on the meta device (no weights loaded)."""

    config = transformers_config(spec)
    with torch.device("meta"):
        model = auto_class(spec.task).from_config(config)
    return {f"transformer.{name}": m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
