"""Read a transformers checkpoint's tensors: model.safetensors (sharded or not) or pytorch_model.bin."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bei.errors import ModelError


def read_hf_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.exists():
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    legacy = folder / "pytorch_model.bin"
    if legacy.exists():
        return dict(torch.load(legacy, map_location="cpu", weights_only=True))
    raise ModelError(f"{folder} holds no weights (model.safetensors, its index, or pytorch_model.bin)")


def strip_prefixes(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop the first of `prefixes` each key starts with ("bert.", "model.", ...): Auto classes differ."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out
