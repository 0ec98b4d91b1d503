"""Task LoRA adapters as jina-embeddings-v3 ships them, merged into the weights at build.

jinaai/jina-embeddings-v3's code (jinaai/xlm-roberta-flash-implementation, modeling_lora.py)
registers a `LoRAParametrization` (torch.nn.utils.parametrize) on every Linear and Embedding of its
XLM-RoBERTa, one adapter per task of config.json's `lora_adaptations` (retrieval.query,
retrieval.passage, separation, classification, text-matching), scaled by `lora_alpha / lora_rank`.
Its weights hold, for a layer `X`:

- `X.parametrizations.weight.original`: the layer's own weight;
- `X.parametrizations.weight.0.lora_A`, `.lora_B`: the adapters stacked on dimension 0, the task's
  index in `lora_adaptations` selecting one. A Linear's (weight [out, in]) are A [tasks, rank, in]
  and B [tasks, out, rank]: W + scale * B[t] @ A[t]. An Embedding's (weight [vocab, dim]) are
  A [tasks, vocab, rank] and B [tasks, rank, dim]: W + scale * A[t] @ B[t].

A build for one task (`trt_llm.build.adapter`) merges that task's adapter into every such weight
and keeps the result under `X.weight`, transformers' name; the task's instruction (config.json
`task_instructions`, e.g. "Represent the query for retrieving evidence documents: " for
retrieval.query) becomes the engine's default prompt, as the authors' `encode(task=...)` prepends it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bei.errors import ModelError
from bei.modeling.files import read_hf_state

ADAPTER_FIELD = "trt_llm.build.adapter"
_ORIGINAL = ".parametrizations.weight.original"
_ADAPTER = ".parametrizations.weight.0."


def adapter_tasks(config: dict[str, Any]) -> tuple[str, ...]:
    """The tasks of the checkpoint's LoRA adapters (config.json `lora_adaptations`); () when it has none."""
    tasks = config.get("lora_adaptations")
    if tasks is None:
        return ()
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ModelError(f"config.json lora_adaptations must be a list of task names, not {tasks!r}")
    return tuple(tasks)


def check_adapter(config: dict[str, Any], adapter: str | None, checkpoint: str) -> None:
    """`adapter` must name one of the checkpoint's adapter tasks, and a checkpoint with adapters needs one."""
    tasks = adapter_tasks(config)
    if not tasks:
        if adapter is not None:
            raise ModelError(
                f"{ADAPTER_FIELD}: {adapter!r} chosen, but {checkpoint} has no task LoRA adapters (config.json lora_adaptations)"
            )
        return
    if adapter is None:
        raise ModelError(
            f"{ADAPTER_FIELD} is required: {checkpoint} ships task LoRA adapters; choose the one merged into the engine: {', '.join(tasks)}"
        )
    if adapter not in tasks:
        raise ModelError(f"{ADAPTER_FIELD}: {adapter!r} is not one of {checkpoint}'s task adapters: {', '.join(tasks)}")


def task_instruction(config: dict[str, Any], adapter: str) -> str:
    """The text the authors' code puts before every input of `adapter`'s task ("" when it has none)."""
    instructions = config.get("task_instructions") or {}
    return str(instructions.get(adapter) or "") if isinstance(instructions, dict) else ""


def merge_adapter(state: dict[str, torch.Tensor], config: dict[str, Any], adapter: str) -> dict[str, torch.Tensor]:
    """`state` with `adapter`'s LoRA delta merged into each parametrized weight, under the plain `.weight` names."""
    index = adapter_tasks(config).index(adapter)
    rank, alpha = int(config.get("lora_rank") or 0), float(config.get("lora_alpha") or 0)
    if rank < 1:
        raise ModelError(f"config.json lora_rank must be a positive integer, not {config.get('lora_rank')!r}")
    scale = alpha / rank
    out = {key: value for key, value in state.items() if _ADAPTER not in key and not key.endswith(_ORIGINAL)}
    for key in [k for k in state if k.endswith(_ORIGINAL)]:
        layer = key.removesuffix(_ORIGINAL)
        weight = state[key]
        a, b = state.get(layer + _ADAPTER + "lora_A"), state.get(layer + _ADAPTER + "lora_B")
        if a is None or b is None:
            raise ModelError(f"{layer}: its weight is parametrized but lora_A / lora_B are missing")
        a, b = a[index].double(), b[index].double()
        if a.shape[-1] == weight.shape[1] and b.shape[0] == weight.shape[0]:  # Linear: B @ A, [out, in]
            delta = b @ a
        elif a.shape[0] == weight.shape[0] and b.shape[-1] == weight.shape[1]:  # Embedding: A @ B, [vocab, dim]
            delta = a @ b
        else:
            raise ModelError(f"{layer}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit its weight {tuple(weight.shape)}")
        # bf16 / fp16 weights (the public checkpoint's bf16) keep the sum in fp32: rounding it back would lose the delta's low bits
        out[layer + ".weight"] = (weight.double() + scale * delta).to(torch.promote_types(weight.dtype, torch.float32))
    return out


def checkpoint_state(folder: Path, config: dict[str, Any], adapter: str | None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (bei/modeling/files.py), `adapter`'s LoRA merged in when one is chosen."""
    state = read_hf_state(folder)
    return state if adapter is None else merge_adapter(state, config, adapter)
