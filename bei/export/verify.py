"""Compare an engine's outputs with the reference torch module on the same inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bei.errors import ExportError


@dataclass(frozen=True)
class Agreement:
    max_abs_diff: float
    min_cosine: float
    samples: int


def compare(reference: np.ndarray, candidate: np.ndarray) -> Agreement:
    """Max absolute difference and the lowest row-wise cosine similarity (rows = first axis)."""
    if reference.shape != candidate.shape:
        raise ExportError(f"engine output shape {candidate.shape} differs from the reference's {reference.shape}")
    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    got = candidate.reshape(candidate.shape[0], -1).astype(np.float64)
    if not np.isfinite(got).all():
        raise ExportError("engine output has NaN or infinite values")
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    dots = (ref * got).sum(axis=1)
    cosine = np.where(norms > 0, dots / np.maximum(norms, 1e-30), 1.0)
    return Agreement(float(np.abs(ref - got).max()), float(cosine.min()), int(ref.shape[0]))


def require_agreement(agreement: Agreement, *, min_cosine: float, max_abs_diff: float, what: str) -> None:
    if agreement.min_cosine < min_cosine or agreement.max_abs_diff > max_abs_diff:
        raise ExportError(
            f"{what} differs from the reference: cosine {agreement.min_cosine:.6f} (need >= {min_cosine}), "
            f"max abs diff {agreement.max_abs_diff:.2e} (allowed {max_abs_diff:.0e}); the engine was not written"
        )
