"""Pooling on the packed layout: [tokens, hidden] -> [rows, hidden * modes], as sentence-transformers.

The same modes and prompt exclusion as `bei.modeling.pooling.pool` on a padded batch, computed with
segment reductions over `seq_index`; no padded copy of the hidden states is made.
"""

from __future__ import annotations

import torch

from bei.modeling.packed.layout import Packed
from bei.modeling.pooling import PoolingConfig, PoolingMode


def _segment_sum(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Per-row sums, accumulated in fp32 (as a padded `sum` would; fp16 atomics would not)."""
    out = torch.zeros((packed.rows, *x.shape[1:]), dtype=torch.float32, device=x.device)
    return out.index_add_(0, packed.seq_index, x.float())


def _segment_count(w: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Per-row sums of the token weights [rows, 1], in fp32, from a running sum: exact for the
    integer weights pooling uses, and no scatter (inductor's CPU code for a scatter-add into a
    single row fails in torch 2.13, and a one-text request is a single row)."""
    running = torch.cumsum(w.float(), dim=0)
    return (running[packed.ends] - running[packed.starts] + w.float()[packed.starts]).unsqueeze(-1)


def pool_packed(config: PoolingConfig, hidden: torch.Tensor, packed: Packed) -> torch.Tensor:
    weight = torch.ones(packed.tokens, dtype=hidden.dtype, device=hidden.device)
    first = packed.starts
    if packed.prompt_length is not None and not config.include_prompt:
        weight = (packed.positions >= packed.prompt_length[packed.seq_index]).to(hidden.dtype)
        first = torch.minimum(first + packed.prompt_length, packed.ends)  # the first token pooled
    outputs: list[torch.Tensor] = []
    for mode in config.modes:
        if mode is PoolingMode.CLS:
            outputs.append(hidden[first])
        elif mode is PoolingMode.LAST_TOKEN:
            outputs.append(hidden[packed.ends] * weight[packed.ends].unsqueeze(-1))
        elif mode in (PoolingMode.MAX, PoolingMode.SPLADE_MAX):
            values = torch.log1p(torch.relu(hidden)) * weight.unsqueeze(-1) if mode is PoolingMode.SPLADE_MAX else hidden
            if mode is PoolingMode.MAX:
                values = values.masked_fill(weight.unsqueeze(-1) == 0, float("-inf"))
            out = hidden.new_full((packed.rows, hidden.shape[-1]), float("-inf"))
            index = packed.seq_index.unsqueeze(-1).expand_as(values)
            outputs.append(out.scatter_reduce(0, index, values, reduce="amax", include_self=True))
        elif mode in (PoolingMode.MEAN, PoolingMode.MEAN_SQRT_LEN, PoolingMode.WEIGHTED_MEAN):
            w = weight * (packed.positions + 1).to(hidden.dtype) if mode is PoolingMode.WEIGHTED_MEAN else weight
            total = _segment_sum(hidden * w.unsqueeze(-1), packed)
            count = torch.clamp(_segment_count(w, packed), min=1e-9)
            outputs.append((total / (torch.sqrt(count) if mode is PoolingMode.MEAN_SQRT_LEN else count)).to(hidden.dtype))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
