"""bge-m3's two extra heads, as FlagEmbedding's BGEM3FlagModel computes them, over the encoder's last
hidden state (`sparse_linear.pt` and `colbert_linear.pt` next to config.json).

The engine's graph output of an `embed_m3` checkpoint is one per-token tensor [batch, seq, width],
its columns (`M3Columns`):

- [0, hidden):                 the last hidden state (the dense embedding is the CLS row's, normalized);
- hidden:                      the sparse weight of the token, relu(sparse_linear(h));
- [hidden + 1, width):         colbert_linear(h) (the ColBERT vector of every token after CLS, normalized).

What the routes make of them (the max weight per token id without special tokens, the normalized
vectors) is the runtime's: bei/api/m3.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bei.errors import ModelError

if TYPE_CHECKING:  # torch only where the heads run (export, the torch target, tests)
    import torch

SPARSE_FILE = "sparse_linear.pt"
COLBERT_FILE = "colbert_linear.pt"


@dataclass(frozen=True)
class M3Columns:
    """Where each output sits in the per-token columns of an `embed_m3` engine."""

    hidden: int
    colbert_dim: int

    @property
    def sparse(self) -> int:
        return self.hidden

    @property
    def colbert(self) -> slice:
        return slice(self.hidden + 1, self.hidden + 1 + self.colbert_dim)

    @property
    def width(self) -> int:
        return self.hidden + 1 + self.colbert_dim


def has_m3_heads(path: Path) -> bool:
    """Whether the checkpoint ships either of bge-m3's heads."""
    return (path / SPARSE_FILE).exists() or (path / COLBERT_FILE).exists()


def _read_head(path: Path, hidden: int) -> dict[str, torch.Tensor]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors all mean an unreadable file
        raise ModelError(f"{path}: not a torch state dict bei can read ({type(err).__name__}: {err})") from None
    weight, bias = state.get("weight") if isinstance(state, dict) else None, state.get("bias") if isinstance(state, dict) else None
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != hidden:
        raise ModelError(f"{path}: needs a Linear's `weight` of shape [out, {hidden}] (the hidden size)")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ModelError(f"{path}: `bias` must have shape [{weight.shape[0]}]")
    return {"weight": weight.float(), "bias": bias.float() if bias is not None else torch.zeros(weight.shape[0])}


def read_colbert_dim(path: Path, hidden: int) -> int:
    """The ColBERT vector width of a bge-m3 checkpoint; both heads checked for shape."""
    for name in (SPARSE_FILE, COLBERT_FILE):
        if not (path / name).exists():
            raise ModelError(f"{path}: a bge-m3 checkpoint needs both {SPARSE_FILE} and {COLBERT_FILE}; {name} is missing")
    sparse = _read_head(path / SPARSE_FILE, hidden)
    if sparse["weight"].shape[0] != 1:
        raise ModelError(f"{path / SPARSE_FILE}: the sparse head has one output, not {sparse['weight'].shape[0]}")
    return int(_read_head(path / COLBERT_FILE, hidden)["weight"].shape[0])


def m3_heads(columns: M3Columns, checkpoint: Path | None = None) -> torch.nn.Module:
    """The heads as one module (hidden [..., hidden] -> [..., width]); weights from `checkpoint` when given."""
    import torch

    class M3Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sparse_linear = torch.nn.Linear(columns.hidden, 1)
            self.colbert_linear = torch.nn.Linear(columns.hidden, columns.colbert_dim)

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            sparse = torch.relu(self.sparse_linear(hidden))
            return torch.cat([hidden, sparse, self.colbert_linear(hidden)], dim=-1)

    heads = M3Heads()
    if checkpoint is not None:
        heads.sparse_linear.load_state_dict(_read_head(checkpoint / SPARSE_FILE, columns.hidden))
        heads.colbert_linear.load_state_dict(_read_head(checkpoint / COLBERT_FILE, columns.hidden))
    return heads
