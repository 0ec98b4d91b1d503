"""Reading a checkpoint's JSON files and tensors, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bei.errors import ModelError

if TYPE_CHECKING:
    import torch


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path} is not valid JSON: {err}") from None


def read_hf_state(folder: Path) -> dict[str, torch.Tensor]:
    """A transformers checkpoint's tensors: model.safetensors (sharded or not) or pytorch_model.bin."""
    import torch
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
