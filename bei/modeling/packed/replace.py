"""Swap a module's Linear layers, by name, for another kind (FP8, bf16), in place."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def replace_linears(module: torch.nn.Module, names: Iterable[str], make: Callable[[torch.nn.Linear], torch.nn.Module]) -> list[str]:
    """Replace each Linear layer named in `names` by `make(layer)`; returns the names."""
    replaced = list(names)
    for name in replaced:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, make(getattr(parent, child)))
    return replaced
