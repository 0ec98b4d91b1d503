"""A transformers checkpoint's tensors under the packed modules' names: prefixes stripped, Linear layers fused."""

from __future__ import annotations

import torch

from bei.modeling.files import read_hf_state as read_hf_state  # (where the packed modules' callers read it)


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


def fuse_linears(state: dict[str, torch.Tensor], parts: tuple[str, ...], fused: str) -> None:
    """Concatenate Linear layers that read the same input into one, in place: for every key holding
    `parts[0]` (e.g. ".attn.q."), the weights and biases of all `parts` become `fused`'s, stacked along
    the output dimension in the order given. A layer with a part missing is left as it is (loading
    then reports the gap)."""
    for key in [k for k in state if parts[0] in k and k.endswith((".weight", ".bias"))]:
        names = [key.replace(parts[0], part) for part in parts]
        if all(name in state for name in names):
            state[key.replace(parts[0], fused)] = torch.cat([state.pop(name) for name in names], dim=0)
