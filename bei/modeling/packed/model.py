"""A checkpoint as bei's own packed torch module: architecture body + task head + pooling.

Each architecture (`encoders.py`, `relative.py`, `nomic.py`, `gte.py`, `jina.py`, `decoders.py`,
`eurobert.py`) is an `nn.Module` built from the checkpoint's config.json (a plain dict: serving never
imports transformers) and the task, whose `forward(packed)` returns, packed, what the transformers
model of that task returns:

- embed:             last hidden state [tokens, hidden]
- rerank / classify: logits [rows, labels]
- ner:               logits [tokens, labels]
- sparse:            masked-LM logits [tokens, vocab]
- embed_m3:          last hidden state [tokens, hidden] (the body is built for embed)

and whose `convert_hf_state(state)` maps a transformers checkpoint's state dict (any of the Auto
classes' key prefixes) to the module's own keys. `PackedEngineModule` adds what EngineModule adds
to transformers: pooling and Dense layers (embed), SPLADE pooling (sparse), bge-m3's heads
(embed_m3); its per-token outputs (NER, embed_m3) stay packed (`Packed.repad` lays it out like the padded batch).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from bei.errors import ModelError
from bei.kinds import PER_TOKEN_TASKS, Task
from bei.modeling.lora import checkpoint_state
from bei.modeling.m3 import m3_heads
from bei.modeling.module import dense_module
from bei.modeling.packed.layout import Packed
from bei.modeling.packed.pooling import pool_packed
from bei.modeling.remote_code import native_config
from bei.modeling.spec import ModelSpec


class Architecture(Protocol):
    def __call__(self, packed: Packed) -> torch.Tensor: ...

    def convert_hf_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False) -> Any: ...


ArchitectureFactory = Callable[[dict[str, Any], Task, int], torch.nn.Module]


def architectures() -> dict[str, ArchitectureFactory]:
    """model_type -> the class of its packed module."""
    from bei.modeling.packed.decoders import DECODERS
    from bei.modeling.packed.encoders import ENCODERS
    from bei.modeling.packed.eurobert import EuroBertEncoder
    from bei.modeling.packed.gte import GteEncoder
    from bei.modeling.packed.jina import JinaEmbeddingsV3Encoder
    from bei.modeling.packed.nomic import NomicBertEncoder
    from bei.modeling.packed.relative import RELATIVE_ENCODERS

    return {**ENCODERS, **RELATIVE_ENCODERS, "nomic_bert": NomicBertEncoder, "eurobert": EuroBertEncoder, "gte": GteEncoder,
            "jina_embeddings_v3": JinaEmbeddingsV3Encoder, **DECODERS}  # fmt: skip


def num_labels(spec: ModelSpec) -> int:
    return len(spec.labels) if spec.task in (Task.RERANK, Task.CLASSIFY, Task.NER) else 0


class PackedEngineModule(torch.nn.Module):
    """body (+ pooling -> Dense for embed, SPLADE pooling for sparse): packed in, batch-first out."""

    def __init__(self, spec: ModelSpec, body: torch.nn.Module, load_heads: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.body = body
        self.dense = torch.nn.Sequential(*[dense_module(layer, load=load_heads) for layer in spec.dense])
        heads = spec.task is Task.EMBED_M3
        self.m3 = m3_heads(spec.m3_columns, spec.path if load_heads else None) if heads else None

    def forward(self, packed: Packed) -> torch.Tensor:
        out = self.body(packed)
        if self.spec.task is Task.EMBED:
            assert self.spec.pooling is not None
            return self.dense(pool_packed(self.spec.pooling, out, packed))
        if self.spec.task is Task.SPARSE:
            assert self.spec.pooling is not None
            return pool_packed(self.spec.pooling, out, packed)
        if self.m3 is not None:
            return self.m3(out)
        return out

    def forward_padded(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        prompt_length: torch.Tensor | None = None,
        left_padded: bool = False,
    ) -> torch.Tensor:
        """The padded batch's outputs, shaped as EngineModule's (per-token outputs re-padded)."""
        packed = Packed.from_padded(input_ids, attention_mask, token_type_ids, prompt_length, device=self._device())
        out = self(packed)
        if self.spec.task in PER_TOKEN_TASKS:
            return packed.repad(out, int(input_ids.shape[1]), left_padded)
        return out

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def read_config(path: Path) -> dict[str, Any]:
    """config.json, in transformers' native spelling (bei/modeling/remote_code.py)."""
    return native_config(dict(json.loads((path / "config.json").read_text())))


def pad_token_id(config: dict[str, Any]) -> int:
    """config.json's `pad_token_id` (filler tokens of static-shape batches); 0 when it has none."""
    value = config.get("pad_token_id")
    return value if isinstance(value, int) else 0


def make_body(spec: ModelSpec, config: dict[str, Any]) -> torch.nn.Module:
    factories = architectures()
    if spec.model_type not in factories:
        raise ModelError(
            f"the torch target has no packed module for model_type {spec.model_type!r} ({spec.architecture}); "
            f"build it with --target onnxruntime (or tensorrt on a GPU); the torch target builds: {', '.join(factories)}"
        )
    task = Task.EMBED if spec.task is Task.EMBED_M3 else spec.task  # bge-m3's heads are PackedEngineModule's
    return factories[spec.model_type](config, task, num_labels(spec))


def load_hf_weights(body: torch.nn.Module, checkpoint: Path, adapter: str | None = None) -> None:
    """The checkpoint's transformers weights (model.safetensors / pytorch_model.bin, sharded too) into
    `body`, with the task LoRA `adapter` merged in (bei/modeling/lora.py) when one is chosen."""
    state = body.convert_hf_state(checkpoint_state(checkpoint, read_config(checkpoint), adapter))  # type: ignore[operator]
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"{checkpoint}: the weights do not match bei's {type(body).__name__}: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )


def build_packed_module(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> PackedEngineModule:
    """The checkpoint at `spec.path` as a packed module, with its transformers weights."""
    body = make_body(spec, read_config(spec.path))
    load_hf_weights(body, spec.path, spec.adapter)
    return PackedEngineModule(spec, body).to(dtype).eval()
