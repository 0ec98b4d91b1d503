"""Pooling: token embeddings + attention mask -> one vector per sequence.

Both spellings of sentence-transformers' `1_Pooling/config.json` (legacy `pooling_mode_*_tokens`
flags and the newer `pooling_mode: "mean"`) parse into one `PoolingConfig`; nothing downstream sees
flags. `pool()` follows sentence-transformers' padded forward exactly (left or right padding), in
plain tensor ops that export to ONNX with dynamic batch and sequence axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bei.errors import ModelError
from bei.modeling.files import read_json

if TYPE_CHECKING:  # torch only where pooling runs (export, tests): the server never imports it
    import torch


class PoolingMode(StrEnum):
    CLS = "cls"
    MEAN = "mean"
    MAX = "max"
    MEAN_SQRT_LEN = "mean_sqrt_len_tokens"
    WEIGHTED_MEAN = "weightedmean"
    LAST_TOKEN = "lasttoken"
    SPLADE_MAX = "splade_max"  # SPLADE: max over tokens of log(1 + relu(MLM logits))


_LEGACY_FLAGS: dict[str, PoolingMode] = {
    "pooling_mode_cls_token": PoolingMode.CLS,
    "pooling_mode_max_tokens": PoolingMode.MAX,
    "pooling_mode_mean_tokens": PoolingMode.MEAN,
    "pooling_mode_mean_sqrt_len_tokens": PoolingMode.MEAN_SQRT_LEN,
    "pooling_mode_weightedmean_tokens": PoolingMode.WEIGHTED_MEAN,
    "pooling_mode_lasttoken": PoolingMode.LAST_TOKEN,
}


@dataclass(frozen=True)
class PoolingConfig:
    """One or more pooling modes (their outputs are concatenated) and whether prompt tokens count."""

    modes: tuple[PoolingMode, ...]
    include_prompt: bool = True

    @property
    def name(self) -> str:
        return "+".join(m.value for m in self.modes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "1_Pooling/config.json") -> PoolingConfig:
        raw = data.get("pooling_mode")
        modes: list[PoolingMode] = []
        if raw is not None:
            names = [raw] if isinstance(raw, str) else list(raw)
            for name in names:
                try:
                    modes.append(PoolingMode(name))
                except ValueError:
                    allowed = ", ".join(m.value for m in PoolingMode if m is not PoolingMode.SPLADE_MAX)
                    raise ModelError(f"{source}: pooling_mode {name!r} is not one of {allowed}") from None
        else:
            modes = [mode for flag, mode in _LEGACY_FLAGS.items() if data.get(flag, False)]
            if not modes:
                modes = [PoolingMode.MEAN]  # sentence-transformers' own default
        return cls(modes=tuple(modes), include_prompt=bool(data.get("include_prompt", True)))

    @classmethod
    def read(cls, path: Path) -> PoolingConfig:
        data = read_json(path)
        if not isinstance(data, dict):
            raise ModelError(f"{path} does not hold a JSON object")
        return cls.from_dict(data, source=str(path))


def exclude_prompt(attention_mask: torch.Tensor, prompt_length: torch.Tensor) -> torch.Tensor:
    """Zero the first `prompt_length[i]` real tokens of each row (after any left padding)."""
    import torch

    pad = attention_mask.to(torch.int64).argmax(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)
    keep = positions >= (pad + prompt_length.to(torch.int64)).unsqueeze(1)
    return attention_mask * keep.to(attention_mask.dtype)


def pool(
    config: PoolingConfig,
    token_embeddings: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: torch.Tensor | None = None,
) -> torch.Tensor:
    """[batch, seq, hidden] x [batch, seq] -> [batch, hidden * len(modes)], as sentence-transformers."""
    import torch

    original_mask = attention_mask
    if prompt_length is not None and not config.include_prompt:
        attention_mask = exclude_prompt(attention_mask, prompt_length)
    dtype = token_embeddings.dtype
    outputs: list[torch.Tensor] = []
    for mode in config.modes:
        mask = attention_mask.unsqueeze(-1).to(dtype)
        if mode is PoolingMode.CLS:
            first = attention_mask.to(torch.int64).argmax(dim=1)
            index = first.view(-1, 1, 1).expand(-1, 1, token_embeddings.shape[-1])
            outputs.append(torch.gather(token_embeddings, 1, index).squeeze(1))
        elif mode is PoolingMode.MAX:
            outputs.append(token_embeddings.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
        elif mode in (PoolingMode.MEAN, PoolingMode.MEAN_SQRT_LEN):
            total = (token_embeddings * mask).sum(dim=1)
            count = torch.clamp(mask.sum(dim=1), min=1e-9)
            outputs.append(total / (count if mode is PoolingMode.MEAN else torch.sqrt(count)))
        elif mode is PoolingMode.WEIGHTED_MEAN:
            weights = torch.arange(1, token_embeddings.shape[1] + 1, device=token_embeddings.device)
            pad = original_mask.to(torch.int64).argmax(dim=1)
            weights = (weights.view(1, -1) - pad.view(-1, 1)).unsqueeze(-1).to(dtype)
            weighted = mask * weights
            total = (token_embeddings * weighted).sum(dim=1)
            outputs.append(total / torch.clamp(weighted.sum(dim=1), min=1e-9))
        elif mode is PoolingMode.LAST_TOKEN:
            seq_len = token_embeddings.shape[1]
            values, indices = attention_mask.to(torch.int64).flip(1).max(dim=1)
            indices = torch.where(values == 0, torch.full_like(indices, seq_len - 1), indices)
            last = (seq_len - indices - 1).view(-1, 1, 1).expand(-1, 1, token_embeddings.shape[-1])
            outputs.append(torch.gather(token_embeddings * mask, 1, last).squeeze(1))
        elif mode is PoolingMode.SPLADE_MAX:
            activated = torch.log1p(torch.relu(token_embeddings)) * mask
            outputs.append(activated.max(dim=1).values)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
