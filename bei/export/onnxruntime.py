"""The CPU target: transformer fusions applied offline to the exported graph, kept only where they agree.

Candidates are tried in order, and the first whose graph agrees with the exported (unfused) graph on
a probe batch is written:

1. onnxscript's ORT fusions (`optimize_for_ort`): Attention / MultiHeadAttention, SkipLayerNorm,
   BiasGelu, RMSNorm, RotaryEmbedding, on any architecture the exporter produced;
2. onnxruntime.transformers' BERT fusions (SkipLayerNorm, BiasGelu; no Attention on dynamo graphs),
   for the BERT family only;
3. the exported graph as it is (ONNX Runtime still applies its generic optimizations at load).

An optimization never fails a build: a candidate that raises or disagrees is skipped with a note.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from bei.export.verify import compare
from bei.modeling.module import input_names
from bei.modeling.spec import ModelSpec
from bei.runtime.base import Batch
from bei.runtime.onnxruntime import OnnxRuntimeBackend

TARGET_NAME = "onnxruntime-cpu"

# model types whose graphs onnxruntime.transformers' BERT fusions understand
_BERT_FUSIONS = {"bert", "roberta", "xlm-roberta", "distilbert"}

# op types written by the fusions: what `bei build` reports as "fused"
FUSED_OPS = frozenset(
    {
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "EmbedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "SimplifiedLayerNormalization",
        "LayerNormalization",
        "BiasGelu",
        "FastGelu",
        "Gelu",
        "RotaryEmbedding",
    }
)

# a fused graph must agree with the exported one this closely (a tenth of the build's fp32 budget
# against transformers, bei/build.py), or it is not used
FUSED_MIN_COSINE = 0.999999
FUSED_MAX_ABS_DIFF = 2e-4

Note = Callable[[str], None]
log = logging.getLogger("bei.export")


@dataclass(frozen=True)
class Candidate:
    name: str
    fuse: Callable[[ModelSpec, Path, Path], None]  # (spec, exported graph, target graph)


def versions() -> dict[str, str]:
    import onnx

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


def optimize(spec: ModelSpec, source: Path, target: Path, note: Note | None = None) -> dict[str, int]:
    """Write `target`: the first candidate graph that agrees with `source`; returns its fused-op counts."""
    note = note or log.warning
    probe = probe_batch(spec)
    expected = run_graph(source, spec, probe)
    for candidate in candidates(spec):
        try:
            candidate.fuse(spec, source, target)
            agreement = compare(expected, run_graph(target, spec, probe))
        except Exception as err:  # noqa: BLE001 - any failure of an optional step means: do without it
            note(f"{candidate.name} skipped: {type(err).__name__}: {str(err)[:300]}")
            continue
        if agreement.min_cosine >= FUSED_MIN_COSINE and agreement.max_abs_diff <= FUSED_MAX_ABS_DIFF:
            return fused_op_counts(target)
        note(
            f"{candidate.name} not used: its graph differs from the exported one "
            f"(cosine {agreement.min_cosine:.7f}, max abs diff {agreement.max_abs_diff:.1e})"
        )
    copy_graph(source, target)
    return {}


def candidates(spec: ModelSpec) -> list[Candidate]:
    found = [Candidate("onnxscript ORT fusions", onnxscript_fusions)]
    if spec.model_type in _BERT_FUSIONS:
        found.append(Candidate("onnxruntime.transformers BERT fusions", bert_fusions))
    return found


def onnxscript_fusions(spec: ModelSpec, source: Path, target: Path) -> None:
    import onnx_ir as ir
    from onnxscript.optimizer import fold_constants
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with _quiet():
        model = ir.load(str(source))
        model, _ = optimize_for_ort(model)
        # Attention takes Q, K and V's weights as one Concat of three initializers: fold it into one,
        # so that the graph holds the weights once and int8 quantization (bei/export/int8.py) sees them
        fold_constants(model, should_fold=lambda node: True if node.op_type == "Concat" else None)
        ir.save(model, str(target), external_data=_data_file(source, target))


def bert_fusions(spec: ModelSpec, source: Path, target: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        optimized = optimize_model(
            str(source),
            model_type="bert",
            num_heads=spec.num_heads,
            hidden_size=spec.hidden_size,
            opt_level=0,
        )
        optimized.save_model_to_file(str(target), use_external_data_format=_data_file(source, target) is not None)


def copy_graph(source: Path, target: Path) -> None:
    import onnx

    data = _data_file(source, target)
    onnx.save_model(
        onnx.load(str(source)),
        str(target),
        save_as_external_data=data is not None,
        all_tensors_to_one_file=True,
        location=data,
    )


def fused_op_counts(graph: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    counts = collections.Counter(node.op_type for node in model.graph.node if node.op_type in FUSED_OPS)
    return dict(sorted(counts.items()))


def probe_batch(spec: ModelSpec, rows: int = 4, width: int = 24) -> Batch:
    """Rows of unequal length (padding on the model's side), token ids every vocabulary holds."""
    rng = np.random.default_rng(0)
    lengths = np.array([width, width - 7, 3, width - 1][:rows], dtype=np.int64)
    columns = np.arange(width)[None, :]
    left = spec.padding_side == "left"
    mask = (columns >= width - lengths[:, None]) if left else (columns < lengths[:, None])
    ids = np.where(mask, rng.integers(5, 100, size=(rows, width)), 0).astype(np.int64)
    return Batch(
        input_ids=ids,
        attention_mask=mask.astype(np.int64),
        token_type_ids=np.zeros_like(ids),
        prompt_length=np.array([1, 0, 1, 2][:rows], dtype=np.int64),
        lengths=lengths,
        left_padded=left,
    )


def run_graph(graph: Path, spec: ModelSpec, batch: Batch) -> np.ndarray:
    backend = OnnxRuntimeBackend(graph, input_names(spec))
    try:
        return backend.infer(batch)
    finally:
        backend.close()


def _data_file(source: Path, target: Path) -> str | None:
    """The external-data file name for `target` when `source` keeps its weights in one."""
    return target.name + ".data" if source.with_name(source.name + ".data").exists() else None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
