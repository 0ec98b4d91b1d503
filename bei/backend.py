"""The backend contract: a padded batch of token ids in, one batch-first array out.

Every backend (ONNX Runtime on the CPU, TensorRT and torch on GPUs, a fake one for tests) implements
`Backend`; nothing above this module knows which one runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bei.text.tokenizer import Encoded


@dataclass(frozen=True)
class Batch:
    """Padded int64 arrays of one engine call. Rows keep the order of `Batch.pad`'s input."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    prompt_length: np.ndarray
    lengths: np.ndarray  # real tokens per row
    left_padded: bool = False

    @classmethod
    def pad(cls, encoded: Sequence[Encoded], pad_id: int, padding_side: str = "right") -> Batch:
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        width = int(lengths.max())
        ids = np.full((len(encoded), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        types = np.zeros((len(encoded), width), dtype=np.int64)
        left = padding_side == "left"
        for row, (enc, n) in enumerate(zip(encoded, lengths, strict=True)):
            cols = slice(width - n, width) if left else slice(0, n)
            ids[row, cols] = enc.ids
            mask[row, cols] = 1
            types[row, cols] = enc.type_ids
        prompt = np.array([e.prompt_length for e in encoded], dtype=np.int64)
        return cls(ids, mask, types, prompt, lengths, left)

    @property
    def tokens(self) -> int:
        """Positions the engine computes, padding included."""
        return int(self.input_ids.size)

    def feeds(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in names}

    def row_tokens(self, output: np.ndarray, row: int) -> np.ndarray:
        """The real (unpadded) positions of row `row` of a per-token output [batch, seq, ...]."""
        n = int(self.lengths[row])
        width = output.shape[1]
        return output[row, width - n :] if self.left_padded else output[row, :n]


class Backend(ABC):
    """Runs a compiled engine. Implementations are leaf modules that know nothing else.

    An engine call is `run(prepare(batch))`: the batcher prepares the next batch (host work, copies
    to the device) on its own thread while the current one runs. Backends with nothing to prepare
    keep the defaults, and `infer` is both in one call."""

    name: str = "backend"
    input_names: list[str]
    # True: the engine computes every position of the padded batch (rows x longest row), and the
    # queue budgets that; False: it packs the batch and computes real tokens only
    pads: bool = True

    @abstractmethod
    def infer(self, batch: Batch) -> np.ndarray:
        """One engine call: batch-first output (the graph's single output)."""

    def prepare(self, batch: Batch) -> object:
        """What `run` needs of `batch`, made ahead of time (inputs on the device, packed, ...)."""
        return batch

    def run(self, prepared: object) -> np.ndarray:
        assert isinstance(prepared, Batch)
        return self.infer(prepared)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds."""
