"""The packed batch: every row's real tokens one after another, with cumulative sequence lengths.

A padded batch [rows, width] of `lengths[i]` real tokens per row (right or left padded) becomes
one stream of `sum(lengths)` tokens; `cu_seqlens` [rows + 1] marks where each row starts, and
`seq_index` [tokens] says which row a token belongs to. `unpack` / `pack` convert per-token tensors
between the two layouts (the CPU attention fallback and per-token outputs use them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Packed:
    input_ids: torch.Tensor  # [tokens] int64
    positions: torch.Tensor  # [tokens] int64: 0.. within each row
    token_type_ids: torch.Tensor | None  # [tokens] int64
    cu_seqlens: torch.Tensor  # [rows + 1] int32
    seq_index: torch.Tensor  # [tokens] int64: the row of each token
    lengths: torch.Tensor  # [rows] int64
    prompt_length: torch.Tensor | None  # [rows] int64: leading tokens excluded from pooling
    max_len: int

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def starts(self) -> torch.Tensor:
        """Index of each row's first token, [rows]."""
        return self.cu_seqlens[:-1].to(torch.int64)

    @property
    def ends(self) -> torch.Tensor:
        """Index of each row's last token, [rows]."""
        return self.cu_seqlens[1:].to(torch.int64) - 1

    @property
    def edges(self) -> torch.Tensor:
        """Each row's first tokens, then each row's last tokens, [2 * rows] ([CLS] and [SEP] in BERT:
        the tokens W8A8 engines compute in bf16, bei/modeling/packed/int8.py)."""
        return torch.cat([self.starts, self.ends])

    @property
    def edge_slots(self) -> torch.Tensor:
        """[tokens]: each token's index in `edges`, -1 for the tokens between a row's first and last."""
        edges = self.edges
        slots = torch.full_like(self.input_ids, -1)
        return slots.index_copy(0, edges, torch.arange(edges.shape[0], device=edges.device))

    @classmethod
    def from_padded(
        cls,
        input_ids: np.ndarray | torch.Tensor,
        attention_mask: np.ndarray | torch.Tensor,
        token_type_ids: np.ndarray | torch.Tensor | None = None,
        prompt_length: np.ndarray | torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> Packed:
        """Pack a padded batch (either padding side); the real tokens are where the mask is 1."""
        ids = torch.as_tensor(input_ids)
        mask = torch.as_tensor(attention_mask).to(torch.bool)
        lengths = mask.sum(dim=1).to(torch.int64)
        cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        flat_ids = ids[mask]  # row-major: each row's real tokens in order
        seq_index = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths)
        positions = torch.arange(flat_ids.shape[0]) - cu[:-1].to(torch.int64)[seq_index]
        types = torch.as_tensor(token_type_ids)[mask] if token_type_ids is not None else None
        prompt = torch.as_tensor(prompt_length).to(torch.int64) if prompt_length is not None else None
        dev = torch.device(device)
        return cls(
            input_ids=flat_ids.to(torch.int64).to(dev, non_blocking=True),
            positions=positions.to(dev, non_blocking=True),
            token_type_ids=types.to(torch.int64).to(dev, non_blocking=True) if types is not None else None,
            cu_seqlens=cu.to(dev, non_blocking=True),
            seq_index=seq_index.to(dev, non_blocking=True),
            lengths=lengths.to(dev, non_blocking=True),
            prompt_length=prompt.to(dev, non_blocking=True) if prompt is not None else None,
            max_len=int(lengths.max()) if lengths.numel() else 0,
        )

    def unpack(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[tokens, ...] -> [rows, max_len, ...], right padded with `fill`."""
        out = x.new_full((self.rows, self.max_len, *x.shape[1:]), fill)
        out[self.seq_index, self.positions] = x
        return out

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, max_len, ...] (right padded) -> [tokens, ...]."""
        return x[self.seq_index, self.positions]

    def key_padding_mask(self) -> torch.Tensor:
        """[rows, max_len] bool: True at real tokens (of the right-padded `unpack` layout)."""
        cols = torch.arange(self.max_len, device=self.device)
        return cols.unsqueeze(0) < self.lengths.unsqueeze(1)

    def repad(self, x: torch.Tensor, width: int, left: bool) -> torch.Tensor:
        """[tokens, ...] -> [rows, width, ...] in the padded batch's own layout (per-token outputs)."""
        out = x.new_zeros((self.rows, width, *x.shape[1:]))
        cols = self.positions + (width - self.lengths[self.seq_index] if left else 0)
        out[self.seq_index, cols] = x
        return out

    def padded_to(self, tokens: int, pad_id: int = 0) -> Packed:
        """This batch padded to exactly `tokens` tokens and as many rows (a static shape per token
        count, for CUDA graphs): empty filler rows, then one filler row of `pad_id` (the model's pad
        token) at position 0 holding the extra tokens. No row attends outside itself, so the real
        rows' outputs are unchanged; filler rows come after the real ones, and filler tokens sit at
        position 0, so every index (first / last token, position embedding) stays in bounds."""
        extra_tokens, extra_rows = tokens - self.tokens, tokens - self.rows
        if extra_tokens < 1:
            raise ValueError(f"cannot pad {self.tokens} tokens to {tokens}: a filler row needs at least one token")
        dev = self.device
        fill_lengths = torch.zeros(extra_rows, dtype=torch.int64, device=dev)
        fill_lengths[-1] = extra_tokens
        last_row = torch.full((extra_tokens,), tokens - 1, dtype=torch.int64, device=dev)
        cu = torch.cat([self.cu_seqlens, self.cu_seqlens[-1] + torch.cumsum(fill_lengths, 0).to(torch.int32)])
        return Packed(
            input_ids=torch.cat([self.input_ids, self.input_ids.new_full((extra_tokens,), pad_id)]),
            positions=torch.cat([self.positions, self.positions.new_zeros(extra_tokens)]),
            token_type_ids=None
            if self.token_type_ids is None
            else torch.cat([self.token_type_ids, self.token_type_ids.new_zeros(extra_tokens)]),
            cu_seqlens=cu,
            seq_index=torch.cat([self.seq_index, last_row]),
            lengths=torch.cat([self.lengths, fill_lengths]),
            prompt_length=None if self.prompt_length is None else torch.cat([self.prompt_length, self.prompt_length.new_zeros(extra_rows)]),
            max_len=tokens,
        )


def bucket(tokens: int, min_tokens: int = 16) -> int:
    """The static token count a batch of `tokens` is padded to for a CUDA graph: the next power of
    two above it (so few distinct graphs), at least `min_tokens`."""
    return max(min_tokens, 1 << tokens.bit_length())
