"""bf16 Linear layers on oneDNN with packed weights and fused epilogues (CPU engines).

`F.linear` on bf16 CPU tensors runs oneDNN's matmul with the weight in its plain layout and writes a
bf16 output that the bias, the activation and the next layer's cast then read and write again.
`torch.ops.mkldnn._linear_pointwise` (what inductor's `freezing` uses) takes a weight packed once into
oneDNN's blocked layout and adds the bias and an activation (GELU, ReLU, ...) before the output is
rounded to bf16: one pass over the output instead of three. Packed weights are opaque oneDNN tensors
that torch.compile cannot take as inputs, so the op here (`bei::onednn_linear`) receives the plain
weight, packs it on first use and keeps the packed copy, keyed by the layer and checked against the
weight's storage and version (a weight loaded or changed later is packed again).
"""

from __future__ import annotations

import itertools
import threading

import torch

# activation name -> oneDNN's (attr, algorithm) in `_linear_pointwise`
POST_OPS: dict[str, tuple[str, str]] = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}
PACK_ROWS = 1024  # the row count oneDNN chooses the packed layout for (the CPU batch parts, CHUNK_TOKENS)

_keys = itertools.count()
_packed: dict[int, tuple[int, int, torch.Tensor]] = {}  # key -> (weight data_ptr, weight version, packed weight)
_lock = threading.Lock()


def available() -> bool:
    """oneDNN (mkldnn) in this torch, with the fused linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def new_key() -> int:
    return next(_keys)


def _packed_weight(weight: torch.Tensor, key: int) -> torch.Tensor:
    stamp = (weight.data_ptr(), weight._version)
    entry = _packed.get(key)
    if entry is None or entry[:2] != stamp:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
        with _lock:
            _packed[key] = (*stamp, packed)
        return packed
    return entry[2]


@torch.library.custom_op("bei::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: int, activation: str) -> torch.Tensor:
    """bf16 [rows, in] @ weight bf16 [out, in]^T (+ bias bf16) -> activation -> bf16 [rows, out]."""
    attr, algorithm = POST_OPS[activation]
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), _packed_weight(weight, key), bias, attr, [], algorithm)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: int, activation: str) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])
