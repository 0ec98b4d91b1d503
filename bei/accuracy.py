"""How close an engine's outputs are to the reference's, in one place: `compare` / `require_agreement`
for an engine that must equal the reference (fp32 builds, the verify stage of every target), and
`accuracy_of_outputs` / `require_accuracy` for quantized engines, judged per task on held-out inputs.
Both measure cosines with `row_cosines`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bei.backend import Batch
from bei.errors import ExportError
from bei.kinds import PER_TOKEN_TASKS, Task


@dataclass(frozen=True)
class Agreement:
    max_abs_diff: float
    min_cosine: float
    samples: int


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine of each row of `a` with the same row of `b`: 1 where both are zero, 0 where one is."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    return np.where(na * nb > 0, dots / np.maximum(na * nb, 1e-300), np.where((na == 0) & (nb == 0), 1.0, 0.0))


def compare(reference: np.ndarray, candidate: np.ndarray) -> Agreement:
    """Max absolute difference and the lowest row-wise cosine similarity (rows = first axis)."""
    if reference.shape != candidate.shape:
        raise ExportError(f"engine output shape {candidate.shape} differs from the reference's {reference.shape}")
    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    got = candidate.reshape(candidate.shape[0], -1).astype(np.float64)
    if not np.isfinite(got).all():
        raise ExportError("engine output has NaN or infinite values")
    return Agreement(float(np.abs(ref - got).max()), float(row_cosines(ref, got).min()), int(ref.shape[0]))


def require_agreement(agreement: Agreement, *, min_cosine: float, max_abs_diff: float, what: str) -> None:
    if agreement.min_cosine < min_cosine or agreement.max_abs_diff > max_abs_diff:
        raise ExportError(
            f"{what} differs from the reference: cosine {agreement.min_cosine:.6f} (need >= {min_cosine}), "
            f"max abs diff {agreement.max_abs_diff:.2e} (allowed {max_abs_diff:.0e}); the engine was not written"
        )


@dataclass(frozen=True)
class Accuracy:
    """How close the quantized module's outputs are to the reference's on held-out inputs.

    `metric` says what the cosines are:
    - "row cosine" (embed, sparse): the cosine of each input's output vector with the reference's;
    - "score correlation" (rerank, classify, NER): for each output score (label), the Pearson correlation
      (the cosine of the centred values) of that score with the reference's over the held-out inputs (NER:
      over their real tokens). A reranker has one score per input and a classifier a few: the cosine of
      such short rows says nothing (two logits near zero can point anywhere), how each score tracks the
      reference across inputs does.
    `top1_agreement`: share of equal argmax labels (classify, NER) or of equally ordered pairs of scores
    (rerank); None for embedders."""

    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    samples: int
    top1_agreement: float | None = None
    qtype: str | None = None
    metric: str = "row cosine"
    cosines: tuple[float, ...] = field(default=(), repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The figures, for the manifest (JSON-ready; per-row cosines left out)."""
        return {
            "min_cosine": self.min_cosine,
            "mean_cosine": self.mean_cosine,
            "max_abs_diff": self.max_abs_diff,
            "samples": self.samples,
            "top1_agreement": self.top1_agreement,
            "metric": self.metric,
        }

    def summary(self) -> str:
        parts = [
            f"min cosine {self.min_cosine:.4f} ({self.metric})",
            f"mean cosine {self.mean_cosine:.4f}",
            f"max abs diff {self.max_abs_diff:.3g}",
        ]
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement {self.top1_agreement:.1%}")
        return ", ".join(parts) + f" on {self.samples} held-out inputs"


def score_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per column: Pearson correlation over the rows (plain cosine where a column does not vary)."""
    out = []
    for j in range(a.shape[1]):
        x, y = a[:, j], b[:, j]
        if len(x) > 1 and x.std() > 0 and y.std() > 0:
            out.append(float(np.corrcoef(x, y)[0, 1]))
        else:
            out.append(float(row_cosines(x[None, :], y[None, :])[0]))
    return np.array(out)


def pair_order_agreement(a: np.ndarray, b: np.ndarray) -> float:
    i, j = np.triu_indices(len(a), k=1)
    if not len(i):
        return 1.0
    return float(np.mean(np.sign(a[i] - a[j]) == np.sign(b[i] - b[j])))


def accuracy_of_outputs(reference: np.ndarray, output: np.ndarray, batch: Batch, task: Task | str, qtype: str | None = None) -> Accuracy:
    """How close `output` is to `reference` on `batch` (held-out inputs): a quantized engine's or module's
    outputs against the unquantized ones."""
    task = Task(task)
    ref, got = np.asarray(reference, dtype=np.float64), np.asarray(output, dtype=np.float64)
    if ref.shape != got.shape:
        raise ExportError(f"quantized output shape {got.shape} differs from the reference's {ref.shape}")
    if not np.isfinite(got).all():
        raise ExportError("quantized output has NaN or infinite values")
    if task in PER_TOKEN_TASKS:  # real tokens only
        ref = np.concatenate([batch.row_tokens(ref, r) for r in range(ref.shape[0])])
        got = np.concatenate([batch.row_tokens(got, r) for r in range(got.shape[0])])
    ref, got = ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)
    top1: float | None = None
    metric = "row cosine"
    if task in (Task.RERANK, Task.CLASSIFY, Task.NER):
        metric = "score correlation"
        cosines = score_correlations(ref, got)
        if ref.shape[1] == 1:
            top1 = pair_order_agreement(ref[:, 0], got[:, 0])
        else:
            top1 = float(np.mean(ref.argmax(axis=1) == got.argmax(axis=1)))
    else:
        cosines = row_cosines(ref, got)
    return Accuracy(
        min_cosine=float(cosines.min()),
        mean_cosine=float(cosines.mean()),
        max_abs_diff=float(np.abs(ref - got).max()),
        samples=int(batch.input_ids.shape[0]),
        top1_agreement=top1,
        qtype=qtype,
        metric=metric,
        cosines=tuple(float(c) for c in cosines),
    )


def require_accuracy(acc: Accuracy, threshold: float = 0.99, *, min_top1: float | None = None) -> None:
    """ExportError unless the worst cosine reaches `threshold` (and top-1 agreement `min_top1`, if given)."""
    what = f"{acc.qtype} quantization" if acc.qtype else "quantization"
    milder = {"fp4": "fp4_mlp_only, fp8 or no_quant", "fp4_mlp_only": "fp8 or no_quant"}.get(acc.qtype or "", "no_quant")
    hint = (
        "calibrate with texts like the production inputs (quantization_config.calib_dataset) or use "
        f"quantization_type {milder}; the engine was not written"
    )
    if acc.min_cosine < threshold:
        raise ExportError(f"{what} keeps cosine {acc.min_cosine:.4f} < {threshold} required: {acc.summary()}; {hint}")
    if min_top1 is not None and acc.top1_agreement is not None and acc.top1_agreement < min_top1:
        raise ExportError(f"{what} keeps top-1 agreement {acc.top1_agreement:.1%} < {min_top1:.1%} required: {acc.summary()}; {hint}")
